"""Weight-only int8 / int4 quantization of the exported decoder with onnxruntime's MatMulNBits.

Only weights are quantized, in blocks of `block_size` consecutive input weights with one
fp32 scale each (and, at 4 bits, an integer zero point). Per part of the model, as
measured on SmolLM2 (README, Edge export):

- **Projections** (every MatMul with a constant weight; GPT-2's `Gemm` layers and a
  fused LM head are first written as MatMul (+ Add) so that they count): int8
  symmetric round-to-nearest, or int4 asymmetric with the codes of GPTQ calibrated on
  training text when `calibrated` has them (round-to-nearest otherwise). Zero is on
  every grid, so pruned weights stay exactly 0. `eight_bit` names layers kept at 8 bits
  in the int4 model (the last decoder layers, which cost the most at 4 bits).
- **LM head**: 8 bits in both models. It alone picks every next token and is the single
  largest matrix of a small model; at 4 bits it cost more than all projections together.
- **Embeddings**: when the LM head is tied to them (SmolLM2, GPT-2, Gemma), the lookup
  reads the LM head's quantized weights (`GatherBlockQuantized`), so the table is stored
  once. An untied table is quantized to 4 bits in the int4 model and kept fp32 in the
  int8 one (onnxruntime's quantizer quantizes lookups to 4 bits only).
- **Compute** (`accuracy_level` 4, the builder's CPU default): MatMulNBits quantizes
  its input activations to int8 per block on the fly and uses the CPU's integer dot
  products; level 0 (fp32 activations) measured no better and 20x slower to decode.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np

from ..errors import JobError
from ..folder import ONNX_NAME, copy_side_files, onnx_bytes
from .graph import quiet

HEAD_BITS = 8


def quantize_decoder(source: Path, folder: Path, bits: int, *, block_size: int = 32, layers: dict | None = None,
                     calibrated: dict | None = None, eight_bit=(), accuracy_level: int = 4,
                     head_bits: int = HEAD_BITS) -> dict:
    """Write `folder/model.onnx`, the weight-only quantized copy of `source/model.onnx`, with its side files.

    `layers`: the projection weights by name ([out, in] tensors), to find them in the
    graph; `calibrated`: GPTQ results by name (`gptq.quantize_modules`); `eight_bit`:
    names of layers to keep at 8 bits in an int4 model; `head_bits`: the LM head's bits in an
    int4 model (the int8 model's is 8).
    """
    import onnx

    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, not {bits}")
    source, folder = Path(source), Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        with quiet():
            model = onnx.load(str(source / ONNX_NAME))
            _as_matmul(model.graph)
            head = _lm_head(model.graph)
            table = _embedding(model.graph, _vocab(model.graph, head))
            tied = head is not None and table is not None and table[1] == head.input[1]
            found = _match_layers(model.graph, layers or {}) if bits == 4 else {}
            upgraded = [node for node, names in found.items() if set(names) <= set(eight_bit)]
            gptq = {node: [calibrated[n] for n in names] for node, names in found.items()
                    if node not in upgraded and all(n in (calibrated or {}) for n in names)}
            head_bits = head_bits if bits == 4 else HEAD_BITS
            narrow_head = head is not None and head_bits == 4
            wide = ([head.name] if head is not None and not narrow_head else []) + upgraded
            model = _quantize(model, bits, block_size, accuracy_level, symmetric=bits == 8,
                              exclude=wide + ([head.name] if narrow_head else []))
            _write_codes(model.graph, gptq)
            if wide:
                model = _quantize(model, 8, block_size, accuracy_level, symmetric=True, include=wide)
            if narrow_head:  # symmetric, as the lookup that shares it reads it
                model = _quantize(model, 4, block_size, accuracy_level, symmetric=True, include=[head.name])
            if tied:
                _share_head_with_embedding(model.graph, table[0], f"{head.name}_Q{head_bits}", head_bits, block_size)
            elif table is not None and bits == 4:
                model = _quantize(model, 4, block_size, accuracy_level, symmetric=True, include=[table[0]],
                                  ops=("Gather",))
            _drop_unused_initializers(model.graph)
            onnx.save(model, str(folder / ONNX_NAME), save_as_external_data=True, all_tensors_to_one_file=True,
                      location=f"{ONNX_NAME}.data", size_threshold=1024)
    except Exception as exc:
        shutil.rmtree(folder, ignore_errors=True)
        text = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise JobError(f"int{bits} quantization of the ONNX model failed ({text}); leave it out of --quantize") from exc
    copy_side_files(source, folder)
    return {
        "file": ONNX_NAME, "bytes": onnx_bytes(folder / ONNX_NAME), "seconds": time.perf_counter() - started,
        "bits": bits, "block_size": block_size, "accuracy_level": accuracy_level,
        "projections": "int8 symmetric round-to-nearest" if bits == 8 else
        f"int4 asymmetric, GPTQ in {len(gptq)} of {len(found) or 'the'} matrices (round-to-nearest elsewhere)",
        "int8_matrices": len(upgraded), "lm_head_bits": head_bits if head is not None else None,
        "embeddings": "shared with the LM head" if tied else ("4-bit" if table and bits == 4 else "fp32"),
    }


def _quantize(model, bits: int, block_size: int, accuracy_level: int, *, symmetric: bool, exclude=(), include=None,
              ops=("MatMul",)):
    """onnxruntime's round-to-nearest MatMulNBits quantizer on the chosen nodes."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=symmetric,
                                     accuracy_level=accuracy_level, nodes_to_exclude=list(exclude),
                                     nodes_to_include=include, op_types_to_quantize=ops)
    quantizer.process()
    return quantizer.model.model


def _match_layers(graph, layers: dict) -> dict[str, list[str]]:
    """{MatMul node: names of the layers whose weights, side by side, are its weight}.

    An exporter may fuse layers that share an input (the builder's qkv_proj), so a
    node's [in, out] weight is matched against the layers' [out, in] weights, row block
    by row block, exactly; a node without a full match is left out.
    """
    from onnx import numpy_helper

    inits = _initializers(graph)
    by_first_row: dict[bytes, list] = {}
    for name, weight in layers.items():
        by_first_row.setdefault(weight[0].numpy().tobytes(), []).append((name, weight.numpy()))
    found = {}
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        rows = numpy_helper.to_array(inits[node.input[1]]).T  # [out, in]
        names, offset = [], 0
        while offset < rows.shape[0]:
            match = next((name for name, weight in by_first_row.get(rows[offset].tobytes(), [])
                          if np.array_equal(weight, rows[offset : offset + weight.shape[0]])), None)
            if match is None:
                break
            names.append(match)
            offset += layers[match].shape[0]
        if names and offset == rows.shape[0]:
            found[node.name] = names
    return found


def _write_codes(graph, calibrated: dict[str, list]) -> None:
    """Put GPTQ's codes, scales and zero points into the int4 nodes round-to-nearest wrote (same grid and layout)."""
    from onnx import numpy_helper

    inits = _initializers(graph)
    nodes = {node.name: node for node in graph.node}
    for name, parts in calibrated.items():
        node = nodes[f"{name}_Q4"]
        codes = np.concatenate([p.codes.numpy() for p in parts]).astype(np.uint8)
        scales = np.concatenate([p.scales.numpy() for p in parts]).astype(np.float32)
        zeros = np.concatenate([p.zeros.numpy() for p in parts]).astype(np.uint8)
        if zeros.shape[1] % 2:
            zeros = np.pad(zeros, ((0, 0), (0, 1)))
        values = {1: _pack(codes), 2: scales, 3: _pack(zeros)}  # two 4-bit values a byte, the first in the low half
        for index, value in values.items():
            old = inits[node.input[index]]
            old.CopyFrom(numpy_helper.from_array(value.reshape(tuple(old.dims)), old.name))


def _pack(values: np.ndarray) -> np.ndarray:
    return (values[:, 0::2] | (values[:, 1::2] << 4)).astype(np.uint8)


def _initializers(graph) -> dict:
    return {init.name: init for init in graph.initializer}


def _lm_head(graph):
    """The MatMul that produces `logits` from a constant weight, if there is one."""
    inits = _initializers(graph)
    producers = {out: node for node in graph.node for out in node.output}
    node = producers.get("logits")
    while node is not None and node.op_type not in ("MatMul",):  # through a final Add / Reshape / Cast
        node = producers.get(node.input[0])
    return node if node is not None and node.input[1] in inits else None


def _embedding(graph, vocab: int | None) -> tuple[str, str] | None:
    """(Gather node name, name of the table it reads) for the token embedding lookup.

    The lookup is the Gather of a constant [vocab, hidden] table, or of the transpose of
    a constant (the builder stores a tied table once, as the LM head's [hidden, vocab]
    weight); the table is reported as the LM head's weight when the two are the same.
    """
    inits = _initializers(graph)
    producers = {out: node for node in graph.node for out in node.output}
    for node in graph.node:
        if node.op_type != "Gather":
            continue
        table = node.input[0]
        if table in inits and inits[table].dims[0] == vocab:
            return node.name, _transposed_twin(graph, table)
        source = producers.get(table)
        if (source is not None and source.op_type == "Transpose" and source.input[0] in inits
                and inits[source.input[0]].dims[-1] == vocab):
            return node.name, source.input[0]
    return None


def _transposed_twin(graph, table: str) -> str:
    """The LM head's weight if it is this [vocab, hidden] table transposed (an exporter stored both), else the table."""
    from onnx import numpy_helper

    inits = _initializers(graph)
    head = _lm_head(graph)
    if head is None:
        return table
    weight, lookup = inits[head.input[1]], inits[table]
    if list(weight.dims) == list(reversed(lookup.dims)) and np.array_equal(
            numpy_helper.to_array(weight).T, numpy_helper.to_array(lookup)):
        return head.input[1]
    return table


def _vocab(graph, head) -> int | None:
    return _initializers(graph)[head.input[1]].dims[-1] if head is not None else None


def _share_head_with_embedding(graph, gather_name: str, head_name: str, bits: int, block_size: int) -> None:
    """The lookup reads the quantized LM head ([vocab, blocks, bytes] -> [vocab, hidden]) as GatherBlockQuantized."""
    from onnx import helper, numpy_helper

    head = next(node for node in graph.node if node.name == head_name)
    weight, scales = head.input[1], head.input[2]
    inits = _initializers(graph)
    vocab, blocks, nbytes = inits[weight].dims
    shape_name = f"{weight}_as_table_shape"
    graph.initializer.append(numpy_helper.from_array(np.array([vocab, blocks * nbytes], np.int64), shape_name))
    index = next(i for i, node in enumerate(graph.node) if node.name == gather_name)
    gather = graph.node[index]
    table = f"{weight}_as_table"
    reshape = helper.make_node("Reshape", [weight, shape_name], [table], name=f"{gather_name}_table")
    lookup = helper.make_node("GatherBlockQuantized", [table, gather.input[1], scales], list(gather.output),
                              name=f"{gather_name}_Q{bits}", domain="com.microsoft", bits=bits,
                              block_size=block_size, gather_axis=0, quantize_axis=1)
    del graph.node[index]
    graph.node.insert(index, lookup)
    graph.node.insert(index, reshape)
    _drop_dead_nodes(graph)


def _drop_dead_nodes(graph) -> None:
    """Remove nodes whose outputs nothing reads (the Transpose that fed the old lookup)."""
    while True:
        used = {name for node in graph.node for name in node.input} | {out.name for out in graph.output}
        dead = [i for i, node in enumerate(graph.node) if not any(out in used for out in node.output)]
        if not dead:
            return
        for i in reversed(dead):
            del graph.node[i]


def _drop_unused_initializers(graph) -> None:
    used = {name for node in graph.node for name in node.input}
    keep = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def _as_matmul(graph) -> None:
    """Products with a constant weight written as MatMul (+ Add), the op MatMulNBits replaces.

    `Gemm(A, B, C)` (GPT-2's Conv1D layers) and `FusedMatMul(A, B, transB=1)` (a tied LM
    head after onnxruntime's fusions) -> `MatMul(A, B or B transposed) + C`.
    """
    from onnx import helper, numpy_helper

    inits = _initializers(graph)
    plain = {"transA": 0, "alpha": 1.0, "beta": 1.0, "transBatchA": 0, "transBatchB": 0}
    for index in reversed(range(len(graph.node))):
        node = graph.node[index]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type not in ("Gemm", "FusedMatMul") or node.input[1] not in inits
                or any(attrs.get(key, value) != value for key, value in plain.items())):
            continue
        weight = node.input[1]
        if attrs.get("transB", 0):
            transposed = numpy_helper.from_array(numpy_helper.to_array(inits[weight]).T.copy(), f"{weight}_T")
            graph.initializer.append(transposed)
            weight = transposed.name
        product = f"{node.output[0]}_matmul"
        nodes = [helper.make_node("MatMul", [node.input[0], weight], [product] if len(node.input) > 2 else
                                  list(node.output), name=f"{node.name}_MatMul")]
        if len(node.input) > 2 and node.input[2]:
            nodes.append(helper.make_node("Add", [product, node.input[2]], list(node.output), name=f"{node.name}_Add"))
        del graph.node[index]
        for offset, new in enumerate(nodes):
            graph.node.insert(index + offset, new)
