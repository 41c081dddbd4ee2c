"""`sae-steer fit-sae`: fit a TopK SAE to the served model's residual stream at one layer, on this machine's
own text, and write it in SAELens format with its quality figures. A small tool, readable top to bottom:

  1. corpus     sae_steer.corpus.training_corpus(): everyday English that the served model wrote itself (its
                answers to a broad instruction set over ~20 everyday topics, generated once with `sae-steer
                make-corpus` and shipped as sae_steer/data/corpus-<model>.jsonl.gz with its provenance and
                licence), with licence texts and Python docstrings (text every machine has) as a tenth; the
                provenance goes into metrics.json and cfg.json beside the SAE. Deterministic; every 20th text
                is held out.
  2. capture    the stream after decoder layer L (sae_steer.capture, through the engine's steering op)
                of the training chunks, up to `tokens` positions. Position 0 of each chunk is dropped:
                its stream has a norm far above the rest (an attention sink) and would dominate the MSE.
  3. train      TopK SAE (Gao et al. 2024), plain torch, Adam:
                    f = TopK_k(relu((s x - b_dec) W_enc + b_enc)),  x_hat = (f W_dec + b_dec) / s
                s: a constant making E|s x|^2 = d_model (folded into the weights when saved);
                b_dec starts at the data mean, W_dec rows random unit vectors, W_enc = W_dec^T;
                after every step W_dec rows are renormalised to unit norm (decoder-norm constraint);
                AuxK: features that have not fired for `dead_after` tokens reconstruct the residual
                error with their own top `aux_k`, weight 1/32 (keeps features alive). Defaults (lr 2e-3,
                batch 1024, decay over the last 20%) were picked on SmolLM2 layer 15: at this few steps,
                lr 4e-4 reached FVE 0.58 where 2e-3 reached 0.80 (59k tokens, 2 epochs); 8 epochs since the
                corpus is small (~60k positions: the whole of it fits the first run's time, see the README).
  4. evaluate   on the held-out chunks, with Hugging Face transformers (float32) and a forward hook on
                model.model.layers[L] that replaces the stream at positions >= 1 by the SAE's reconstruction:
                fraction of variance explained (1 - sum|x - x_hat|^2 / sum|x - mean|^2), L0 (mean number of
                active features), next-token cross-entropy clean / spliced / with the layer's mean stream
                spliced in instead (loss recovered = (CE_mean - CE_sae) / (CE_mean - CE_clean)).
                Dead fraction: features that never fired during the last training epoch.
  5. write      SAELens folder (cfg.json + sae_weights.safetensors, architecture "topk", hook
                blocks.L.hook_resid_post) + metrics.json; it loads with sae_steer.formats.load_sae.
"""
from __future__ import annotations

import json
import operator
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

def _say(msg: str) -> None:
    print(f"[fit-sae] {msg}", file=sys.stderr, flush=True)


# ---- 3. the SAE and its trainer ----

@dataclass
class FitConfig:
    features: int = 4096
    k: int = 32
    epochs: int = 8
    batch: int = 1024
    lr: float = 2e-3  # constant, then linear decay to 0 over the last 20% of steps
    aux_k: int = 256
    aux_weight: float = 1 / 32
    dead_after: int = 200_000  # tokens without firing -> a feature counts as dead for AuxK
    seed: int = 0


class TopKSAE(torch.nn.Module):
    def __init__(self, d_model: int, features: int, k: int, b_dec: torch.Tensor, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        W_dec = torch.randn(features, d_model, generator=g)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        self.W_dec = torch.nn.Parameter(W_dec)
        self.W_enc = torch.nn.Parameter(W_dec.T.clone().contiguous())
        self.b_enc = torch.nn.Parameter(torch.zeros(features))
        self.b_dec = torch.nn.Parameter(b_dec.clone().float())
        self.k = k

    def pre(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def topk(self, pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        top = pre.topk(k, dim=-1)
        return top.indices, torch.relu(top.values)

    def decode(self, idx: torch.Tensor, vals: torch.Tensor, bias: bool = True) -> torch.Tensor:
        out = F.embedding_bag(idx, self.W_dec, per_sample_weights=vals, mode="sum")  # sum_j vals_j W_dec[idx_j]
        return out + self.b_dec if bias else out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(*self.topk(self.pre(x), self.k))

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)


def train_sae(acts: torch.Tensor, cfg: FitConfig, progress: bool = True) -> tuple[TopKSAE, float, dict]:
    """acts [n, d] (model units) -> (SAE trained on s * acts, s, training stats)."""
    acts = acts.float()
    n, d = acts.shape
    scale = float((d / acts.pow(2).sum(-1).mean()).sqrt())
    torch.manual_seed(cfg.seed)
    sae = TopKSAE(d, cfg.features, cfg.k, acts.mean(0) * scale, cfg.seed)
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr)
    steps = cfg.epochs * (n // cfg.batch)
    decay_from = int(0.8 * steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (steps - i) / max(steps - decay_from, 1)))
    since_fired = torch.zeros(cfg.features, dtype=torch.long)
    fired_last_epoch = torch.zeros(cfg.features, dtype=torch.bool)
    g = torch.Generator().manual_seed(cfg.seed)
    start, step, history = time.monotonic(), 0, []
    for epoch in range(cfg.epochs):
        order = torch.randperm(n, generator=g)
        fired_last_epoch.zero_()
        for b in range(n // cfg.batch):
            x = acts[order[b * cfg.batch:(b + 1) * cfg.batch]] * scale
            pre = sae.pre(x)
            idx, vals = sae.topk(pre, cfg.k)
            x_hat = sae.decode(idx, vals)
            err = x - x_hat
            mse = err.pow(2).sum(-1).mean()
            loss = mse
            fired = torch.zeros(cfg.features, dtype=torch.bool)
            fired[idx[vals > 0]] = True
            since_fired = torch.where(fired, 0, since_fired + cfg.batch)
            fired_last_epoch |= fired
            dead = since_fired > cfg.dead_after
            n_dead = int(dead.sum())
            if n_dead:  # AuxK: the dead features' top pre-activations reconstruct the error
                aux_idx, aux_vals = sae.topk(pre.masked_fill(~dead, float("-inf")), min(cfg.aux_k, n_dead))
                e = err.detach()
                e_hat = sae.decode(aux_idx, aux_vals, bias=False)
                aux = (e - e_hat).pow(2).sum(-1).mean() / (e - e.mean(0)).pow(2).sum(-1).mean()
                loss = loss + cfg.aux_weight * aux.nan_to_num(0.0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            sae.normalize_decoder()
            step += 1
            if progress and (step % 50 == 0 or step == steps):
                fve = 1 - float(mse.detach()) / float((x - x.mean(0)).pow(2).sum(-1).mean())
                history.append({"step": step, "fve": round(fve, 4), "dead": n_dead})
                rate = step * cfg.batch / (time.monotonic() - start)
                _say(f"epoch {epoch + 1}/{cfg.epochs} step {step}/{steps}: batch FVE {fve:.3f}, "
                     f"{n_dead} features dead, {rate:.0f} tok/s")
    stats = {"steps": step, "train_seconds": round(time.monotonic() - start, 1), "history": history,
             "dead_last_epoch": int((~fired_last_epoch).sum())}
    return sae, scale, stats


def reconstruction_mse(sae: TopKSAE, scale: float, acts: torch.Tensor) -> float:
    """Mean |x - x_hat|^2 in model units (x_hat = sae(s x) / s)."""
    with torch.no_grad():
        return float((acts.float() - sae(acts.float() * scale) / scale).pow(2).sum(-1).mean())


# ---- 5. SAELens output ----

def to_sparse_autoencoder(sae: TopKSAE, scale: float, layer: int):
    """The SAE in model units (s folded: W_enc *= s, W_dec /= s, b_dec /= s), as sae_steer's SparseAutoencoder."""
    from sae_steer.sae import SparseAutoencoder
    with torch.no_grad():
        return SparseAutoencoder(W_enc=sae.W_enc.detach() * scale, b_enc=sae.b_enc.detach().clone(),
                                 W_dec=sae.W_dec.detach() / scale, b_dec=sae.b_dec.detach() / scale,
                                 layer=layer, architecture="topk", k=sae.k)


def write_saelens(sae, out_dir: Path, model_name: str, extra: dict | None = None) -> Path:
    """A SAELens (v6) topk folder: cfg.json + sae_weights.safetensors, in model units."""
    out_dir.mkdir(parents=True, exist_ok=True)
    hook = f"blocks.{sae.layer}.hook_resid_post"
    save_file({"W_enc": sae.W_enc.contiguous(), "b_enc": sae.b_enc.contiguous(), "W_dec": sae.W_dec.contiguous(),
               "b_dec": sae.b_dec.contiguous()}, str(out_dir / "sae_weights.safetensors"))
    cfg = {"architecture": "topk", "d_in": sae.d_model, "d_sae": sae.d_sae, "k": sae.k, "dtype": "float32",
           "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": "none",
           "rescale_acts_by_decoder_norm": False, "reshape_activations": "none",
           "metadata": {"hook_name": hook, "model_name": model_name, "sae_lens_version": "6.12.1",
                        "trained_with": "sae-steer fit-sae", **(extra or {})}}
    (out_dir / "cfg.json").write_text(json.dumps(cfg, indent=1) + "\n")
    return out_dir


# ---- 4. evaluation with Hugging Face transformers ----

def evaluate(model_path: str, layer: int, sae, texts: list[str], max_tokens: int, mean_stream: torch.Tensor) -> dict:
    """FVE and L0 of `sae` (model units) on held-out texts, and the next-token loss with the stream at
    layer `layer`, positions >= 1, replaced by the reconstruction or by the mean stream."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    from sae_steer.vllm_plugin.adapters import family_of
    block = operator.attrgetter(family_of(model.config.architectures).hf_blocks)(model)[layer]
    mode, sums = {"value": "clean"}, {"sse": 0.0, "sst": 0.0, "l0": 0.0, "n": 0}
    mean_stream = mean_stream.float()

    def hook(_module, _inputs, output):
        h = output[0] if isinstance(output, tuple) else output
        if mode["value"] == "clean":
            return None
        x = h[:, 1:]
        if mode["value"] == "sae":
            f = sae.encode(x)
            x_new = sae.decode(f)
            sums["sse"] += float((x - x_new).pow(2).sum())
            sums["sst"] += float((x - mean_stream).pow(2).sum())
            sums["l0"] += float((f > 0).sum())
            sums["n"] += x.shape[0] * x.shape[1]
        else:
            x_new = mean_stream.expand_as(x)
        h = torch.cat([h[:, :1], x_new.to(h.dtype)], dim=1)
        return (h, *output[1:]) if isinstance(output, tuple) else h

    handle = block.register_forward_hook(hook)
    losses = {"clean": 0.0, "sae": 0.0, "mean": 0.0}
    n_pred = 0
    try:
        with torch.no_grad():
            for text in texts:
                ids = tok(text, return_tensors="pt")["input_ids"][:, :max_tokens]
                if ids.shape[1] < 3:
                    continue
                n_pred += ids.shape[1] - 1
                for which in losses:
                    mode["value"] = which
                    logits = model(ids).logits[0, :-1]
                    losses[which] += float(F.cross_entropy(logits, ids[0, 1:], reduction="sum"))
    finally:
        handle.remove()
    ce = {k: v / n_pred for k, v in losses.items()}
    # sst uses the training mean, not the held-out one: a slightly stricter FVE
    return {"fve": 1 - sums["sse"] / sums["sst"], "l0": sums["l0"] / sums["n"], "eval_tokens": sums["n"],
            "ce_clean": ce["clean"], "ce_sae": ce["sae"], "ce_mean_ablation": ce["mean"],
            "ce_delta": ce["sae"] - ce["clean"],
            "loss_recovered": (ce["mean"] - ce["sae"]) / (ce["mean"] - ce["clean"])}


# ---- the command ----

def write_records(sae, model: str, capture_dir: Path, out_dir: Path, tokenizer, progress: bool = True) -> None:
    """Feature records beside the SAE (top contexts over the training capture, logit lens, labels): what the
    server's feature and search routes serve (sae_steer.feature_records)."""
    from transformers import AutoModelForCausalLM

    from sae_steer.feature_records import records_from_capture, save_feature_records
    from sae_steer.vllm_plugin.adapters import family_of
    from sae_steer.vllm_plugin.logit_bias import head_of_hf
    t0 = time.monotonic()
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    head = head_of_hf(hf, family_of(hf.config.architectures))
    path = save_feature_records(records_from_capture(sae, capture_dir, tokenizer, head), out_dir)
    if progress:
        _say(f"feature records (top contexts, logit lens, labels) -> {path} in {time.monotonic() - t0:.0f} s")


def _reusable_capture(work: Path, model: str, layer: int, n_texts: int, max_tokens_per_text: int) -> dict | None:
    """The manifest of an earlier capture of the same texts, model and layer in `work`, else None."""
    try:
        m = json.loads((work / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    same = m.get("model") == model and layer in m.get("layers", ()) and m.get("n_texts") == n_texts and \
        m.get("max_tokens_per_text") == max_tokens_per_text
    return m if same else None


def default_out_dir(model: str, layer: int, features: int) -> Path:
    """$XDG_CACHE_HOME/sae-steer/saes/<model>-L<layer>-<features> (fitted SAEs stay out of the repository)."""
    from sae_steer.models import cache_dir, known
    entry = known(model)
    name = entry.folder if entry else Path(model).name
    return cache_dir().parent / "saes" / f"{name}-L{layer}-{features}"


def fit_sae(model: str, layer: int, out_dir: str | Path, *, tokens: int = 200_000, cfg: FitConfig | None = None,
            max_tokens_per_text: int = 256, eval_texts: int = 32, work_dir: str | Path | None = None,
            texts: tuple[list[str], list[str]] | None = None, dtype: str | None = None, enforce_eager: bool = True,
            progress: bool = True) -> dict:
    """Capture, train, evaluate, write. Returns the metrics (also written to out_dir/metrics.json). `dtype`: the
    capture engine's (default: this machine's, sae_steer.machine_dtype)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from sae_steer.capture import capture_activations, load_activations, load_field
    from sae_steer.machine_dtype import pick_dtype
    from sae_steer.models import resolve_model

    cfg = cfg or FitConfig()
    t0 = time.monotonic()
    model = resolve_model(model)
    out_dir = Path(out_dir)
    work = Path(work_dir) if work_dir else out_dir / "activations"
    from sae_steer.corpus import training_corpus
    if texts is None:
        train_texts, held_texts, corpus = training_corpus(model)
    else:
        (train_texts, held_texts), corpus = texts, {"mix": "texts given to fit_sae"}
    # texts until `tokens` training positions are covered (each text cut to max_tokens_per_text, position 0 dropped)
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(model)
    chosen, count = [], 0
    for t in train_texts:
        if count >= tokens:
            break
        chosen.append(t)
        count += max(min(len(tokenizer(t)["input_ids"]), max_tokens_per_text) - 1, 0)
    if progress:
        _say(f"model {model}, layer {layer}: {len(chosen)} training texts ({count} positions), "
             f"{min(eval_texts, len(held_texts))} held out; features {cfg.features}, k {cfg.k}")

    manifest = _reusable_capture(work, model, layer, len(chosen), max_tokens_per_text)
    if manifest is not None:
        _say(f"reusing the capture in {work} ({manifest['n_tokens']} positions)")
    else:
        from vllm import LLM
        llm = LLM(model=model, dtype=pick_dtype(dtype), enforce_eager=enforce_eager,
                  max_model_len=max_tokens_per_text + 8, seed=0, enable_prefix_caching=False,
                  additional_config={"sae_steer": {"layers": [layer]}})
        try:
            manifest = capture_activations(llm, chosen, [layer], work, max_tokens_per_text=max_tokens_per_text,
                                           progress=progress)
        finally:
            llm.llm_engine.engine_core.shutdown()
            del llm
    capture_seconds = time.monotonic() - t0

    acts = load_activations(work, layer)[load_field(work, "pos") > 0][:tokens]
    if progress:
        _say(f"captured {manifest['n_tokens']} positions in {capture_seconds:.0f} s; training on {len(acts)} "
             f"(position 0 of each text dropped)")
    init = TopKSAE(acts.shape[1], cfg.features, cfg.k, torch.zeros(acts.shape[1]), cfg.seed)
    sae, scale, stats = train_sae(acts, cfg, progress)
    with torch.no_grad():
        init.b_dec.copy_(acts.float().mean(0) * scale)
    mse_init, mse_final = reconstruction_mse(init, scale, acts[:20000]), reconstruction_mse(sae, scale, acts[:20000])

    fitted = to_sparse_autoencoder(sae, scale, layer)
    if progress:
        _say(f"evaluating on {min(eval_texts, len(held_texts))} held-out texts (Hugging Face, float32)")
    metrics = evaluate(model, layer, fitted, held_texts[:eval_texts], max_tokens_per_text, acts.float().mean(0))
    metrics.update({"dead_fraction": stats["dead_last_epoch"] / cfg.features, "mse_init": mse_init,
                    "mse_final": mse_final, "train_tokens": len(acts), "capture_seconds": round(capture_seconds, 1),
                    "train_seconds": stats["train_seconds"], "total_seconds": round(time.monotonic() - t0, 1),
                    "layer": layer, "model": model, "input_scale": scale, "config": asdict(cfg),
                    "corpus": corpus,
                    "loss_eval": "Hugging Face transformers float32, forward hook on model.model.layers[L] "
                                 "replacing positions >= 1", "history": stats["history"]})
    write_saelens(fitted, out_dir, Path(model).name, {"fit": {k: metrics[k] for k in ("fve", "l0", "dead_fraction",
                                                                                       "ce_delta")},
                                                       "corpus": corpus.get("provenance", corpus["mix"])})
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    write_records(fitted, model, work, out_dir, tokenizer, progress)
    from sae_steer.evaluate import interpretability_check
    metrics["interpretability"] = interpretability_check(out_dir)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    if progress:
        for name, e in metrics["interpretability"].items():
            _say(f"concept {name}: feature {e['feature']} ({e.get('label')!r}), {e.get('contexts_on_concept', 0)}/"
                 f"{e.get('contexts', 0)} top contexts on its words -> {'passed' if e['passed'] else 'NOT passed'}")
    if progress:
        _say(f"done in {metrics['total_seconds']:.0f} s: FVE {metrics['fve']:.3f}, L0 {metrics['l0']:.1f}, "
             f"dead {metrics['dead_fraction']:.3f}, CE {metrics['ce_clean']:.3f} -> {metrics['ce_sae']:.3f} "
             f"(mean-ablation {metrics['ce_mean_ablation']:.3f}) -> {out_dir}")
    return metrics
