"""The FX passes of awq_compile (installed as `awq_compile.passes`).

The order of the pipeline lives here, in one list, and nowhere else:

    annotate_scale_groups -> insert_observers -> (calibration runs) -> remove_observers
    -> search_scales -> fold_scales -> search_clip -> swap_linear_int4

The compile backend also runs `fuse_gated_mlp`, `fuse_sibling_linears`, `fuse_rope_cache`,
`defer_split_k`, `fuse_add_rms_norm`, `swap_add_rms_norm`, `swap_decode_attention` and `defer_cache_counters` on each graph it serves (after
the quantization: one
`int4_linear_glu` call for a SwiGLU MLP's gate and up projections and their activation, one
`int4_linear_multi` call for the INT4 linears that read one input, one `int4_linear_rope_cache`
call for q/k/v with their rotary embedding and KV-cache write, then the K-slice sum of a split-K
decode linear left to the graph, then a residual add and RMSNorm taken into the gated-MLP or
q/k/v call that reads it, each add + RMSNorm left as one `add_rms_norm` call, a decode step's attention as one `decode_attention` call, and a static
cache's position counters read by the q/k/v calls, their increments made once at the end).

Analysis passes write frozen dataclasses into `node.meta["awq"]`; the rewriting passes read only
those. `awq_compile.api` drives the pipeline for `quantize`, the compile backend for dynamo graphs.
"""

from .annotate_scale_groups import LinearInfo, ScaleGroup, annotate_scale_groups, linear_infos, scale_groups
from .defer_cache_counters import defer_cache_counters
from .defer_split_k import defer_split_k
from .fold_scales import fold_scales
from .fuse_add_rms_norm import fuse_add_rms_norm
from .fuse_gated_mlp import fuse_gated_mlp
from .fuse_rope_cache import fuse_rope_cache
from .fuse_sibling_linears import fuse_sibling_linears
from .insert_observers import GroupObserver, insert_observers, remove_observers
from .search_clip import search_clip
from .search_scales import search_scales
from .swap_add_rms_norm import swap_add_rms_norm
from .swap_decode_attention import swap_decode_attention
from .swap_linear_int4 import quantize_linear, swap_linear_int4

PIPELINE = (
    "annotate_scale_groups",
    "insert_observers",
    "calibrate",
    "remove_observers",
    "search_scales",
    "fold_scales",
    "search_clip",
    "swap_linear_int4",
)
"""The pass order, by name; `awq_compile.api.run_pipeline` follows it step by step."""

__all__ = [
    "PIPELINE",
    "LinearInfo",
    "ScaleGroup",
    "GroupObserver",
    "annotate_scale_groups",
    "insert_observers",
    "remove_observers",
    "search_scales",
    "fold_scales",
    "search_clip",
    "swap_linear_int4",
    "fuse_sibling_linears",
    "swap_add_rms_norm",
    "fuse_gated_mlp",
    "defer_split_k",
    "fuse_rope_cache",
    "fuse_add_rms_norm",
    "swap_decode_attention",
    "defer_cache_counters",
    "quantize_linear",
    "linear_infos",
    "scale_groups",
]
