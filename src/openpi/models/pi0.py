"""pi0 and pi0.5: the model (`Pi0`, in `pi0_model`) and its config (`Pi0Config`, in `pi0_config`), importable from
here as upstream openpi's `openpi.models.pi0` (with `make_attn_mask` and `posemb_sincos`).

The config creates the model (`Pi0Config.create` / `load`), so the model module does not import the config: it reads
it through the family seam (`family.ModelConfig`, `layout.TokenLayout`).
"""

from openpi.models.pi0_config import Pi0Config
from openpi.models.pi0_model import Pi0, make_attn_mask, posemb_sincos

__all__ = ["Pi0", "Pi0Config", "make_attn_mask", "posemb_sincos"]
