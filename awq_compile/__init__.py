"""awq_compile: AWQ INT4 weight quantization as a PyTorch compiler pass.

    import awq_compile
    qmodel = awq_compile.quantize(model, calibration=batches,
                                  config=awq_compile.AWQConfig(group_size=64))
"""

from . import ops  # noqa: F401  (registers torch.ops.awq.int4_linear)
from . import _cuda  # noqa: F401  (CUDA kernels over the op, when the library is built)
from .config import AWQConfig, Int4Format
from .nn import Int4Linear
from .api import quantize, quantize_rtn
from .checkpoint import apply_checkpoint, load_quantized, save_quantized
from .backend import calibration
from .export import export
from .onnx_export import to_onnx
from .tensorrt import to_tensorrt

__all__ = ["AWQConfig", "Int4Format", "Int4Linear", "quantize", "quantize_rtn", "save_quantized",
           "load_quantized", "apply_checkpoint", "calibration", "export", "to_onnx", "to_tensorrt"]
__version__ = "0.1.0"
