// The sae-steer playground: plain JavaScript, no build step, no framework, no outside asset.
// Safety rule of this file: every string that comes from the server (model text, labels, contexts, tokens,
// error messages) enters the page through el() / text nodes / textContent, never as HTML; the page sets no
// innerHTML anywhere. The keys typed in live in `keys` only (no storage, no cookie).
"use strict";

const $ = (id) => document.getElementById(id);
const keys = { api: "", admin: "" };
const page = {
  saes: [], vectors: [], cards: new Map(), interventions: [],
  lens: null, lensShown: "unsteered",
};

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "class") node.className = v;
    else if (k === "on") for (const [event, fn] of Object.entries(v)) node.addEventListener(event, fn);
    else if (k === "value" || k === "checked" || k === "disabled" || k === "hidden") node[k] = v;
    else node.setAttribute(k, String(v));  // attribute values are never parsed as HTML
  }
  for (const child of children) if (child !== null && child !== undefined) node.append(child);  // strings: text
  return node;
}

function say(message, ok = false) {
  $("status").textContent = message;
  $("status").className = ok ? "ok" : "";
}

// ---- the server's own routes (relative URLs: this origin only) ----

async function api(path, { method = "GET", body = undefined, admin = false } = {}) {
  const headers = {};
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (keys.api) headers["Authorization"] = "Bearer " + keys.api;
  if (admin && keys.admin) headers["X-Steering-Admin-Key"] = keys.admin;
  const response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(`${response.status}: ${(data.error && data.error.message) || data.detail && JSON.stringify(data.detail) || response.statusText}`);
  return data;
}

async function loadLists() {
  page.saes = (await api("v1/steering/saes")).data;
  page.vectors = (await api("v1/steering/vectors")).data;
  const select = $("sae");
  select.replaceChildren(...page.saes.map((s) => el("option", { value: s.name }, `${s.name} (layer ${s.layer}, ${s.d_sae})`)));
  if (!$("build-layers").value && page.saes.length) $("build-layers").value = String(page.saes[0].layer);
  renderInterventions();
}

// ---- 1. find: search, feature card ----

async function search() {
  const word = $("search").value.trim();
  if (!word) return;
  const sae = $("sae").value;
  const found = await api(`v1/steering/saes/${encodeURIComponent(sae)}/features?search=${encodeURIComponent(word)}&limit=20`);
  $("results").replaceChildren(...(found.data.length ? found.data.map((hit) => el("li", {},
    el("button", { class: "link", on: { click: () => openCard(sae, hit.index) } }, `#${hit.index}`), " ",
    hit.label ?? "", el("span", { class: "muted" }, ` score ${hit.score}`))) : [el("li", { class: "muted" }, "no feature mentions it")]));
  say(`${found.data.length} features for "${word}"`, true);
}

async function card(sae, index) {
  const key = `${sae}#${index}`;
  if (!page.cards.has(key)) page.cards.set(key, await api(`v1/steering/saes/${encodeURIComponent(sae)}/features/${index}?top_k=8`));
  return page.cards.get(key);
}

function contextLine(context) {
  return el("div", { class: "context" }, ...context.tokens.map((t, i) => (i === context.at ? el("mark", {}, t) : t)),
    el("span", { class: "muted" }, `  (${context.activation.toFixed(2)})`));
}

async function openCard(sae, index) {
  const f = await card(sae, index);
  const tokens = (list) => list.map((t) => el("span", { class: "chip", title: `logit ${t.logit.toFixed(3)}` }, t.token));
  const calibrated = Object.entries(f.calibration || {});
  const box = $("card");
  box.replaceChildren(
    el("h3", {}, `${sae} #${index} `, el("span", { class: "label" }, f.label ?? "(no label)")),
    f.auto_label != null ? el("div", { class: "muted" }, "automatic label: ", el("span", { class: "auto-label" }, f.auto_label)) : null,
    el("div", {}, `layer ${f.layer} · decoder norm ${f.decoder_norm.toFixed(3)}`,
      f.frequency != null ? ` · density ${(100 * f.frequency).toFixed(2)}% of tokens · max activation ${f.max_activation.toFixed(2)}` : ""),
    el("div", {}, "calibrated: ", calibrated.length ? calibrated.map(([mode, c]) => `${mode} ${c.strength}`).join(", ") : "none"),
    el("div", {}, "promotes: ", ...tokens(f.top_tokens)),
    el("div", {}, "suppresses: ", ...tokens(f.bottom_tokens)),
    f.contexts ? el("div", { class: "contexts" }, el("div", { class: "muted" }, "top contexts"), ...f.contexts.map(contextLine)) : null,
    el("div", { class: "row" },
      ...["add", "clamp", "ablate", "scale", "logit"].map((mode) => el("button", { class: `steer-${mode}`,
        on: { click: () => addIntervention({ kind: "sae", sae, feature: index, mode }) } }, `steer: ${mode}`))));
  box.hidden = false;
  say(`feature ${index} of ${sae}`, true);
}

// ---- 2. steer: interventions built with controls ----

const DEFAULTS = { add: 8, clamp: 4, scale: 2, logit: 4, ablate: 0 };

function addIntervention(spec) {
  const iv = spec.kind === "sae"
    ? { kind: "sae", sae: spec.sae ?? (page.saes[0] && page.saes[0].name), feature: spec.feature ?? 0,
        mode: spec.mode ?? "add", amount: DEFAULTS[spec.mode ?? "add"], auto: false, gate: null }
    : { kind: "vector", vector: spec.vector ?? (page.vectors[0] && page.vectors[0].name), amount: 1,
        auto: false, layer: null };
  page.interventions.push(iv);
  if (iv.kind === "sae") refreshFeature(iv);
  renderInterventions();
}

function refreshFeature(iv) {  // its card (label, calibration); "auto" on where this mode is calibrated
  card(iv.sae, iv.feature).then((f) => { iv.auto = !!(f.calibration && f.calibration[iv.mode]); })
    .catch(() => { iv.auto = false; }).finally(renderInterventions);
}

function calibratedFor(iv) {
  if (iv.kind === "vector") {
    const v = page.vectors.find((x) => x.name === iv.vector);
    return v && v.calibration ? v.calibration.coef : null;
  }
  const f = page.cards.get(`${iv.sae}#${iv.feature}`);
  return f && f.calibration && f.calibration[iv.mode] ? f.calibration[iv.mode].strength : null;
}

function slider(iv, label, min, max, step, autoAllowed) {
  const number = el("input", { type: "number", step, value: iv.amount, class: "amount" });
  const range = el("input", { type: "range", min, max, step, value: iv.amount, class: "strength" });
  const set = (v) => { iv.amount = Number(v); range.value = v; number.value = v; updateRequest(); };
  range.addEventListener("input", () => set(range.value));
  number.addEventListener("input", () => set(number.value));
  const calibrated = autoAllowed ? calibratedFor(iv) : null;
  if (!autoAllowed) iv.auto = false;
  const auto = el("input", { type: "checkbox", checked: iv.auto && calibrated !== null, disabled: calibrated === null, class: "auto" });
  auto.addEventListener("change", () => { iv.auto = auto.checked; range.disabled = number.disabled = auto.checked; updateRequest(); });
  range.disabled = number.disabled = auto.checked;
  return el("label", {}, label, " ", range, number, autoAllowed ? el("label", {
    title: calibrated === null ? "no calibration stored" : `calibrated: ${calibrated}` },
  auto, calibrated === null ? " auto (not calibrated)" : ` auto (${calibrated})`) : null);
}

function select(options, value, onChange, cls = "") {
  const node = el("select", { class: cls }, ...options.map(([v, text]) => el("option", { value: v }, text)));
  node.value = value;
  node.addEventListener("change", () => onChange(node.value));
  return node;
}

function renderInterventions() {
  const rows = page.interventions.map((iv, n) => {
    const remove = el("button", { class: "remove", on: { click: () => { page.interventions.splice(n, 1); renderInterventions(); } } }, "remove");
    if (iv.kind === "vector") {
      const v = page.vectors.find((x) => x.name === iv.vector);
      return el("div", { class: "intervention" },
        el("div", { class: "row" }, `#${n + 1} vector `,
          select(page.vectors.map((x) => [x.name, `${x.name} (${x.source}, layers ${x.layers.join(",")})`]), iv.vector,
            (value) => { iv.vector = value; iv.layer = null; renderInterventions(); }),
          "layer ", select([["", "its own"], ...(v ? v.layers : []).map((L) => [String(L), String(L)])], iv.layer ?? "",
            (value) => { iv.layer = value === "" ? null : Number(value); updateRequest(); }), remove),
        el("div", { class: "row" }, slider(iv, "coef", -32, 32, 0.5, true)));
    }
    const feature = el("input", { type: "number", min: 0, value: iv.feature, class: "feature" });
    feature.addEventListener("change", () => { iv.feature = Number(feature.value); refreshFeature(iv); });
    const gate = el("input", { type: "checkbox", checked: iv.gate !== null, class: "gate" });
    gate.addEventListener("change", () => { iv.gate = gate.checked ? { feature: iv.feature, above: 0 } : null; renderInterventions(); });
    const gateControls = iv.gate === null ? [] : [
      " feature ", numberInput(iv.gate.feature, 1, (v) => { iv.gate.feature = v; }),
      " above ", numberInput(iv.gate.above, 0.1, (v) => { iv.gate.above = v; })];
    const label = page.cards.get(`${iv.sae}#${iv.feature}`);
    return el("div", { class: "intervention" },
      el("div", { class: "row" }, `#${n + 1} SAE `,
        select(page.saes.map((s) => [s.name, s.name]), iv.sae, (value) => { iv.sae = value; refreshFeature(iv); }),
        "feature ", feature, label ? el("span", { class: "muted" }, label.label ?? "") : null,
        "mode ", select(["add", "clamp", "ablate", "scale", "logit"].map((m) => [m, m]), iv.mode,
          (value) => { iv.mode = value; iv.amount = DEFAULTS[value]; refreshFeature(iv); }, "mode"), remove),
      el("div", { class: "row" },
        iv.mode === "ablate" ? el("span", { class: "muted" }, "ablate: the feature's activation is removed")
          : slider(iv, { add: "strength", clamp: "value", scale: "factor", logit: "strength" }[iv.mode],
            iv.mode === "scale" ? -4 : -64, iv.mode === "scale" ? 8 : 64, iv.mode === "scale" ? 0.1 : 0.5,
            iv.mode === "add" || iv.mode === "logit"),  // "auto" exists for these (calibration.py)
        iv.mode === "logit" ? null : el("label", {}, gate, " only when"), ...gateControls));
  });
  $("interventions").replaceChildren(...(rows.length ? rows : [el("p", { class: "muted" }, "no interventions: add one, or open a feature card")]));
  updateRequest();
}

function numberInput(value, step, onInput) {
  const node = el("input", { type: "number", step, value });
  node.addEventListener("input", () => { onInput(Number(node.value)); updateRequest(); });
  return node;
}

function interventionJSON(iv, amount = iv.amount, auto = iv.auto) {
  if (iv.kind === "vector") {
    const out = { type: "vector", vector: iv.vector, coef: auto ? "auto" : amount };
    if (iv.layer !== null) out.layer = iv.layer;
    return out;
  }
  if (iv.mode === "logit") return { type: "logit", sae: iv.sae, feature: iv.feature, strength: auto ? "auto" : amount };
  const out = { type: "sae", sae: iv.sae, feature: iv.feature, mode: iv.mode };
  if (iv.mode === "add") out.strength = auto ? "auto" : amount;
  if (iv.mode === "clamp") out.value = amount;
  if (iv.mode === "scale") out.factor = amount;
  if (iv.gate !== null) out.when = { feature: iv.gate.feature, above: iv.gate.above };
  return out;
}

function steering(firstAmount) {  // firstAmount: a sweep's number for the first intervention (not "auto")
  if (!page.interventions.length) return null;
  return {
    interventions: page.interventions.map((iv, n) => (n === 0 && firstAmount !== undefined
      ? interventionJSON(iv, firstAmount, false) : interventionJSON(iv))),
    positions: $("positions").value,
  };
}

// ---- 3. compare: the request, streamed answers, sweeps ----

function chosenSeed() {
  if ($("seed").value === "") $("seed").value = String(Math.floor(Math.random() * 2 ** 31));
  return Number($("seed").value);
}

function buildRequest({ firstAmount, stream = $("stream").checked, compare = $("compare").checked, telemetry = $("telemetry").checked } = {}) {
  const chat = document.querySelector("input[name=api]:checked").value === "chat";
  const body = { model: page.model, max_tokens: Number($("max-tokens").value), temperature: Number($("temperature").value) };
  if ($("seed").value !== "") body.seed = Number($("seed").value);
  if (chat) body.messages = [{ role: "user", content: $("prompt").value }];
  else body.prompt = $("prompt").value;
  const s = steering(firstAmount);
  if (s) body.steering = s;
  if (s && compare) body.compare = true;
  if (telemetry && page.saes.length) {
    body.telemetry = { sae: $("sae").value, top_k: Number($("telemetry-k").value) };
    if (chat) { body.logprobs = true; body.top_logprobs = 0; } else body.logprobs = 0;  // the tokens, for the heat map
  }
  if (stream) body.stream = true;
  const extra = $("extra").value.trim();
  if (extra) Object.assign(body, JSON.parse(extra));
  return { path: chat ? "v1/chat/completions" : "v1/completions", body, chat };
}

function updateRequest() {
  let request;
  try { request = buildRequest(); } catch (e) { $("request-json").textContent = `extra fields: ${e.message}`; return; }
  const json = JSON.stringify(request.body, null, 2);
  const url = new URL(request.path, location.href).href;
  $("request-json").textContent = json;
  $("request-curl").textContent = `curl ${url} -H 'Content-Type: application/json' -d '${JSON.stringify(request.body).replaceAll("'", "'\\''")}'`;
  const { messages, prompt, model, ...rest } = request.body;
  const extraBody = {}; const kwargs = {};
  for (const [k, v] of Object.entries(rest)) (["steering", "telemetry", "compare"].includes(k) ? extraBody : kwargs)[k] = v;
  const py = (v) => (v === null ? "None" : v === true ? "True" : v === false ? "False"  // JSON -> a Python literal
    : Array.isArray(v) ? `[${v.map(py).join(", ")}]`
    : typeof v === "object" ? `{${Object.entries(v).map(([k, x]) => `${JSON.stringify(k)}: ${py(x)}`).join(", ")}}`
    : JSON.stringify(v));
  const args = [`model=${py(model)}`, request.chat ? `messages=${py(messages)}` : `prompt=${py(prompt)}`,
    ...Object.entries(kwargs).map(([k, v]) => `${k}=${py(v)}`), `extra_body=${py(extraBody)}`];
  $("request-python").textContent = `from openai import OpenAI\nclient = OpenAI(base_url=${py(new URL("v1", location.href).href)}, api_key="-")\n` +
    `r = client.${request.chat ? "chat.completions" : "completions"}.create(${args.join(", ")})`;
}

function answerBox(title) {
  const text = el("div", { class: "text" });
  const box = el("div", { class: "answer" }, el("h3", {}, title), text);
  return { box, text };
}

function choiceText(choice, chat) {
  if (!choice) return "";
  return chat ? ((choice.message && choice.message.content) || (choice.delta && choice.delta.content) || "") : (choice.text || "");
}

function choiceTokens(choice, chat) {  // the sampled tokens' strings (logprobs), for the heat map
  const lp = choice && choice.logprobs;
  if (!lp) return [];
  return chat ? (lp.content || []).map((t) => t.token) : (lp.tokens || []);
}

async function* sse(response) {  // the data payloads of an event stream
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) if (line.startsWith("data: ")) yield line.slice(6);
    }
  }
}

async function generate() {
  chosenSeed();
  const request = buildRequest();
  updateRequest();
  const seed = request.body.seed;
  $("seed-shown").textContent = `seed ${seed}`;
  const steered = answerBox(request.body.steering ? "steered" : "unsteered (no interventions)");
  const plain = request.body.compare ? answerBox("unsteered") : null;
  $("answers").replaceChildren(steered.box, ...(plain ? [plain.box] : []));
  const result = { tokens: [], telemetry: [], text: "" };
  say("generating…", true);
  const headers = { "Content-Type": "application/json" };
  if (keys.api) headers["Authorization"] = "Bearer " + keys.api;
  const response = await fetch(request.path, { method: "POST", headers, body: JSON.stringify(request.body) });
  if (!response.ok) {
    const data = await response.json().catch(() => ({}));
    throw new Error(`${response.status}: ${(data.error && data.error.message) || response.statusText}`);
  }
  if (request.body.stream) {
    for await (const data of sse(response)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      const choice = chunk.choices && chunk.choices[0];
      if (choice) {
        result.text += choiceText(choice, request.chat);
        result.tokens.push(...choiceTokens(choice, request.chat));
        result.telemetry.push(...(choice.telemetry || []));
        steered.text.textContent = result.text;
      }
      if (chunk.unsteered && plain) plain.text.textContent = chunk.unsteered.error ? chunk.unsteered.error.message : choiceText(chunk.unsteered.choices[0], request.chat);
    }
  } else {
    const body = await response.json();
    const choice = body.choices[0];
    result.text = choiceText(choice, request.chat);
    result.tokens = choiceTokens(choice, request.chat);
    result.telemetry = choice.telemetry || [];
    steered.text.textContent = result.text;
    if (plain && body.unsteered) plain.text.textContent = choiceText(body.unsteered.choices[0], request.chat);
  }
  renderHeatmap(result, request.body.telemetry && request.body.telemetry.sae);
  say(`done (seed ${seed})`, true);
}

async function sweep() {
  if (!page.interventions.length) throw new Error("a sweep needs an intervention: its first one's strength is swept");
  const values = $("sweep").value.split(",").map((s) => s.trim()).filter(Boolean).map(Number);
  if (!values.length || values.some((v) => !Number.isFinite(v))) throw new Error("sweep: a comma-separated list of numbers");
  const seed = chosenSeed();
  $("seed-shown").textContent = `seed ${seed}`;
  const requests = values.map((v) => buildRequest({ firstAmount: v, stream: false, compare: false, telemetry: false }));
  const boxes = values.map((v) => answerBox(`${page.interventions[0].kind === "vector" ? "coef" : "strength"} ${v}`));
  $("answers").replaceChildren(...boxes.map((b) => b.box));
  say(`sweeping ${values.length} strengths in one batch…`, true);
  // Sent together, so the engine batches them in the same steps.
  const answers = await Promise.all(requests.map((r) => api(r.path, { method: "POST", body: r.body })));
  answers.forEach((a, i) => { boxes[i].text.textContent = choiceText(a.choices[0], requests[i].chat); });
  say(`swept ${values.length} strengths (seed ${seed})`, true);
}

// ---- 4. look inside: telemetry as a heat map ----

function renderHeatmap(result, sae) {
  const box = $("heatmap");
  $("inspector").replaceChildren();
  if (!result.telemetry.length) {
    box.replaceChildren(el("span", { class: "muted" }, sae ? "no telemetry records" : "turn telemetry on to see the features of each token"));
    return;
  }
  const byToken = new Map(result.telemetry.map((r) => [r.token_index, r.features]));
  const peak = Math.max(1e-9, ...result.telemetry.flatMap((r) => r.features.map((f) => f.activation)));
  const tokens = result.tokens.length ? result.tokens : [result.text];
  box.replaceChildren(...tokens.map((token, i) => {
    const features = (byToken.get(i) || []).slice().sort((a, b) => b.activation - a.activation);
    const top = features.length ? features[0].activation : 0;
    // a token that decodes to nothing alone (a piece of a UTF-8 character) still gets its cell
    const span = token === "" ? el("span", { class: "tok bytes", "data-index": i, title: "part of a character" }, "·")
      : el("span", { class: "tok", "data-index": i }, token);
    span.style.setProperty("background-color", `rgba(var(--warm), ${(0.08 + 0.8 * top / peak).toFixed(3)})`);  // CSSOM: allowed by the CSP
    span.addEventListener("mouseenter", () => inspect(span, token, features, sae));
    span.addEventListener("click", () => inspect(span, token, features, sae));
    return span;
  }));
}

function inspect(span, token, features, sae) {
  for (const s of document.querySelectorAll("#heatmap .pinned")) s.classList.remove("pinned");
  span.classList.add("pinned");
  $("inspector").replaceChildren(el("div", {}, "token ", el("span", { class: "chip" }, token), ` · ${features.length} active features`),
    el("ol", {}, ...features.map((f) => {
      const label = el("span", { class: "flabel" }, f.label ?? "");
      if (f.label == null) card(sae, f.index).then((c) => { label.textContent = c.label ?? ""; }).catch(() => {});  // records' label
      return el("li", {}, el("button", { class: "link", on: { click: () => openCard(sae, f.index) } }, `#${f.index}`), " ",
        label, el("span", { class: "muted" }, ` ${f.activation.toFixed(3)}`));
    })));
}

// ---- 5. logit lens: positions x layers ----

async function runLens() {
  const prompt = $("prompt").value;
  const s = steering();
  say("running the lens…", true);
  const [plain, steered] = await Promise.all([
    api("v1/steering/lens", { method: "POST", body: { prompt, top_k: 3 } }),
    s ? api("v1/steering/lens", { method: "POST", body: { prompt, top_k: 3, steering: s } }) : Promise.resolve(null)]);
  page.lens = { unsteered: plain, steered };
  page.lensShown = "unsteered";
  $("lens-toggle").disabled = !steered;
  renderLens();
  say(`lens over ${plain.tokens.length} positions x ${plain.layers.length} layers`, true);
}

function renderLens() {
  const shown = page.lens[page.lensShown];
  const other = page.lens[page.lensShown === "steered" ? "unsteered" : "steered"];
  $("lens-which").textContent = page.lensShown === "steered"
    ? "steered (outlined: the top token differs from the unsteered one; a layer's row is read before its own edits)" : "unsteered";
  $("lens-toggle").textContent = page.lensShown === "steered" ? "Show unsteered" : "Show steered";
  const rows = shown.layers.map((L, li) => ({ L, li })).reverse().map(({ L, li }) => el("tr", {}, el("th", {}, `layer ${L}`),
    ...shown.grid[li].map((cell, pos) => {
      const td = el("td", { title: cell.map((c) => `${JSON.stringify(c.token)} ${(100 * c.prob).toFixed(1)}%`).join("\n") }, cell[0].token);
      td.style.setProperty("background-color", `rgba(var(--cool), ${(0.05 + 0.6 * cell[0].prob).toFixed(3)})`);
      if (page.lensShown === "steered" && other && other.grid[li][pos][0].token_id !== cell[0].token_id) td.classList.add("changed");
      return td;
    })));
  const header = el("tr", {}, el("th", {}, "input"), ...shown.tokens.map((t) => el("th", {}, t)));
  $("lens-grid").replaceChildren(el("table", { class: "lens" }, el("tbody", {}, ...rows, header)));
}

// ---- 6. build a CAA vector (admin key) ----

async function build() {
  const lines = (id) => $(id).value.split("\n").map((s) => s.trim()).filter(Boolean);
  const positive = lines("build-positive"), negative = lines("build-negative");
  if (!positive.length || positive.length !== negative.length) throw new Error("build: as many positive as negative texts, one per line");
  const layers = $("build-layers").value.split(",").map((s) => s.trim()).filter(Boolean).map(Number);
  const name = $("build-name").value.trim();
  say("building…", true);
  const built = await api("v1/steering/vectors", { method: "POST", admin: true,
    body: { name, layers, overwrite: true, pairs: positive.map((p, i) => ({ positive: p, negative: negative[i] })) } });
  $("build-result").textContent = `built ${built.name} from ${built.pairs} pairs; norms ${Object.entries(built.norms).map(([L, n]) => `L${L} ${n.toFixed(2)}`).join(", ")}`;
  page.vectors = (await api("v1/steering/vectors")).data;
  addIntervention({ kind: "vector", vector: built.name });
  say(`vector ${built.name} built: steering with it`, true);
}

// ---- wiring ----

function guarded(fn) {
  return () => Promise.resolve().then(fn).catch((e) => say(String(e.message || e)));
}

document.addEventListener("DOMContentLoaded", () => {
  $("api-key").addEventListener("input", () => { keys.api = $("api-key").value; });
  $("api-key").addEventListener("change", guarded(start));  // with vLLM's --api-key, nothing loads before it
  $("admin-key").addEventListener("input", () => { keys.admin = $("admin-key").value; });
  $("search-go").addEventListener("click", guarded(search));
  $("search").addEventListener("keydown", (e) => { if (e.key === "Enter") guarded(search)(); });
  $("feature-go").addEventListener("click", guarded(() => openCard($("sae").value, Number($("feature-index").value))));
  $("add-sae").addEventListener("click", () => addIntervention({ kind: "sae", sae: $("sae").value }));
  $("add-vector").addEventListener("click", () => addIntervention({ kind: "vector" }));
  $("generate-go").addEventListener("click", guarded(generate));
  $("sweep-go").addEventListener("click", guarded(sweep));
  $("lens-go").addEventListener("click", guarded(runLens));
  $("lens-toggle").addEventListener("click", () => { page.lensShown = page.lensShown === "steered" ? "unsteered" : "steered"; renderLens(); });
  $("build-go").addEventListener("click", guarded(build));
  for (const id of ["copy-json", "copy-curl", "copy-python"]) {
    $(id).addEventListener("click", guarded(async () => {
      await navigator.clipboard.writeText($(id.replace("copy", "request")).textContent);
      say("copied", true);
    }));
  }
  for (const node of document.querySelectorAll("#generate input, #generate textarea, #positions, #sae")) {
    node.addEventListener("input", updateRequest);
    node.addEventListener("change", updateRequest);
  }
  guarded(start)();
});

async function start() {
  page.model = (await api("v1/models")).data[0].id;
  await loadLists();
  say("ready", true);
}
