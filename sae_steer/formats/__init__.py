"""File formats -> SparseAutoencoder / steering vectors. One module per format."""
from sae_steer.formats.native import (load_sae, load_vector, read_sae_facts, read_vector_layers, save_sae,
                                      save_vector)

__all__ = ["load_sae", "load_vector", "read_sae_facts", "read_vector_layers", "save_sae", "save_vector"]
