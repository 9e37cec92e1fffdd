"""Everything tapc writes for deployment, and the checks that each file computes what the model does.

    OUT/model/      the pruned model, Hugging Face layout (folder.py)
    OUT/sparse/     non-zero values + bitmask safetensors (compressor.sparse)
    OUT/onnx/       fp32 decoder with KV cache + genai_config.json (graph.py), checked
                    against PyTorch (parity.py, onnx_outputs.py)
    OUT/onnx-int8/  weight-only int8 and int4 copies (quantize.py), each a folder that
    OUT/onnx-int4/  onnxruntime-genai and `tapc generate` run as it is; int4 calibrated by GPTQ
                    (gptq.py)
    OUT/gguf/       model-TYPE.gguf for llama.cpp, Ollama and LM Studio, read back with
                    transformers and measured (gguf.py)

`export_artifacts` is the call `compress` makes after saving `OUT/model/`;
`export_model` does the same for any saved model directory (`tapc export`) (artifacts.py);
`export_lines` summarises what was written (summary.py). The sparse format itself lives in
`compressor.sparse`, the output folders' layout in `compressor.folder`: loading reads them too.

An ONNX or GGUF failure never takes the other outputs with it: the sparse artifact and
the safetensors model stay, the report records the error, and the caller raises it
once everything else is written.
"""

from .artifacts import export_artifacts, export_error, export_model
from .summary import export_lines

__all__ = ["export_artifacts", "export_error", "export_lines", "export_model"]
