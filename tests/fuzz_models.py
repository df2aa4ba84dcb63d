"""Mutated model files: the tool must never print a traceback, never hang, exit 0
only with a verified output, and otherwise refuse with a GraphPruneError, write
nothing and leave the input as it was. Used by //tests:fuzz_test (a CI-size
slice) and //tests:fuzz_large (thousands of cases, each in a worker process
with a timeout).

Seeds: small random CNNs (tests/random_cnn.py) as ONNX (opsets 13, 17, 21)
and as TensorFlow GraphDefs (binary and text), and ShuffleNet (ONNX opset 9,
IR 3, from the onnx package's test data). Mutations: bit flips, truncation,
inserted bytes, and structure-aware ones on the parsed protobuf: wrong dtypes,
shapes that lie (weights, inputs, outputs), swapped and duplicated nodes,
inputs and initializers, changed attributes, removed nodes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import traceback

import numpy as np

from tests import onnx_net
from tests import random_cnn

BYTE_MUTATIONS = ("bitflip", "truncate", "insert")
PROTO_MUTATIONS = ("dtype", "dims", "io_shape", "swap_inputs", "swap_nodes", "duplicate_node",
                   "duplicate_init", "attribute", "drop_node", "rename_input")
MUTATIONS = BYTE_MUTATIONS + PROTO_MUTATIONS
SEEDS = ("shufflenet9", "onnx13", "onnx17", "onnx21", "pb", "pbtxt")


@dataclasses.dataclass(frozen=True)
class Case:
  seed_model: str     # one of SEEDS
  mutation: str       # one of MUTATIONS
  seed: int


def seed_model(name: str, path_base: str) -> str:
  """Writes seed model `name` (built from a fixed random CNN) and returns its path."""
  if name == "shufflenet9":                     # opset 9, IR 3: initializers are inputs
    import onnx  # pylint: disable=g-import-not-at-top
    path = path_base + ".onnx"
    onnx.save_model(onnx_net.filled_shufflenet(), path)
    return path
  if name.startswith("onnx"):
    path = path_base + ".onnx"
    random_cnn.build(random_cnn.Case(7, "onnx", int(name[4:]), 0.5, "l1"), path)
    return path
  path = path_base + ".pb"
  random_cnn.build(random_cnn.Case(7, "tf", 17, 0.5, "l1"), path)
  if name == "pbtxt":
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    from google.protobuf import text_format  # pylint: disable=g-import-not-at-top
    gd = tf.compat.v1.GraphDef()
    with open(path, "rb") as f:
      gd.ParseFromString(f.read())
    os.remove(path)
    path = path_base + ".pbtxt"
    with open(path, "w", encoding="utf-8") as f:
      f.write(text_format.MessageToString(gd))
  return path


def _mutate_bytes(data: bytes, kind: str, rng) -> bytes:
  buf = bytearray(data)
  if kind == "bitflip":
    for _ in range(int(rng.integers(1, 9))):
      i = int(rng.integers(0, len(buf)))
      buf[i] ^= 1 << int(rng.integers(0, 8))
    return bytes(buf)
  if kind == "truncate":
    return bytes(buf[:int(rng.integers(0, len(buf)))])
  at = int(rng.integers(0, len(buf) + 1))
  return bytes(buf[:at]) + rng.integers(0, 256, int(rng.integers(1, 17))).astype(
      np.uint8).tobytes() + bytes(buf[at:])


def _pick(rng, seq):
  return seq[int(rng.integers(0, len(seq)))] if len(seq) else None


def _mutate_onnx(data: bytes, kind: str, rng) -> bytes:
  import onnx  # pylint: disable=g-import-not-at-top
  m = onnx.ModelProto()
  m.ParseFromString(data)
  g = m.graph
  nodes, inits = list(g.node), list(g.initializer)
  if kind == "dtype" and inits:
    _pick(rng, inits).data_type = int(rng.integers(1, 17))
  elif kind == "dims" and inits:
    t = _pick(rng, inits)
    dims = list(t.dims)
    if dims and rng.random() < 0.5:
      dims[int(rng.integers(0, len(dims)))] += int(rng.choice([-1, 1, 2]))
    else:
      dims = dims[:-1] if dims and rng.random() < 0.5 else dims + [1]
    del t.dims[:]
    t.dims.extend(max(0, d) for d in dims)
  elif kind == "io_shape":
    vi = _pick(rng, list(g.input) + list(g.output))
    dims = vi.type.tensor_type.shape.dim
    if len(dims):
      d = dims[int(rng.integers(0, len(dims)))]
      d.dim_value = int(rng.integers(0, 20))
  elif kind == "swap_inputs" and len(nodes) > 1:
    a, b = _pick(rng, nodes), _pick(rng, nodes)
    if a.input and b.input:
      i, j = int(rng.integers(0, len(a.input))), int(rng.integers(0, len(b.input)))
      a.input[i], b.input[j] = b.input[j], a.input[i]
  elif kind == "swap_nodes" and len(nodes) > 1:
    i, j = int(rng.integers(0, len(nodes))), int(rng.integers(0, len(nodes)))
    a, b = onnx.NodeProto(), onnx.NodeProto()
    a.CopyFrom(g.node[i])
    b.CopyFrom(g.node[j])
    g.node[i].CopyFrom(b)
    g.node[j].CopyFrom(a)
  elif kind == "duplicate_node" and nodes:
    g.node.add().CopyFrom(_pick(rng, nodes))
  elif kind == "duplicate_init" and inits:
    g.initializer.add().CopyFrom(_pick(rng, inits))
  elif kind == "attribute":
    with_attrs = [n for n in nodes if n.attribute]
    n = _pick(rng, with_attrs)
    if n is not None:
      a = _pick(rng, list(n.attribute))
      if a.type == onnx.AttributeProto.INT:
        a.i = int(rng.integers(-2, 9))
      elif a.type == onnx.AttributeProto.INTS and len(a.ints):
        a.ints[int(rng.integers(0, len(a.ints)))] = int(rng.integers(-2, 9))
      elif a.type == onnx.AttributeProto.FLOAT:
        a.f = float(rng.choice([-1.0, 0.0, np.nan, np.inf]))
  elif kind == "drop_node" and nodes:
    del g.node[int(rng.integers(0, len(nodes)))]
  elif kind == "rename_input" and nodes:
    n = _pick(rng, nodes)
    if n.input:
      n.input[int(rng.integers(0, len(n.input)))] = f"missing_{int(rng.integers(0, 99))}"
  return m.SerializeToString()


def _mutate_tf(data: bytes, kind: str, rng, text: bool) -> bytes:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from google.protobuf import text_format  # pylint: disable=g-import-not-at-top
  gd = tf.compat.v1.GraphDef()
  if text:
    text_format.Parse(data.decode("utf-8"), gd)
  else:
    gd.ParseFromString(data)
  nodes = list(gd.node)
  consts = [n for n in nodes if n.op == "Const"]
  if kind == "dtype" and consts:
    n = _pick(rng, consts)
    n.attr["dtype"].type = int(rng.integers(1, 20))
  elif kind == "dims" and consts:
    shape = _pick(rng, consts).attr["value"].tensor.tensor_shape
    if len(shape.dim):
      shape.dim[int(rng.integers(0, len(shape.dim)))].size += int(rng.choice([-1, 1, 2]))
    else:
      shape.dim.add().size = int(rng.integers(0, 4))
  elif kind == "io_shape":
    ph = [n for n in nodes if n.op == "Placeholder"]
    if ph and ph[0].attr["shape"].shape.dim:
      dims = ph[0].attr["shape"].shape.dim
      dims[int(rng.integers(0, len(dims)))].size = int(rng.integers(-1, 20))
  elif kind == "swap_inputs" and len(nodes) > 1:
    a, b = _pick(rng, nodes), _pick(rng, nodes)
    if a.input and b.input:
      i, j = int(rng.integers(0, len(a.input))), int(rng.integers(0, len(b.input)))
      a.input[i], b.input[j] = b.input[j], a.input[i]
  elif kind == "swap_nodes" and len(nodes) > 1:
    i, j = int(rng.integers(0, len(nodes))), int(rng.integers(0, len(nodes)))
    gd.node[i].name, gd.node[j].name = gd.node[j].name, gd.node[i].name
  elif kind == "duplicate_node" and nodes:
    copy = gd.node.add()
    copy.CopyFrom(_pick(rng, nodes))
    if rng.random() < 0.5:
      copy.name += "_dup"
  elif kind == "duplicate_init" and consts:
    gd.node.add().CopyFrom(_pick(rng, consts))
  elif kind == "attribute":
    n = _pick(rng, [n for n in nodes if n.op in ("Conv2D", "DepthwiseConv2dNative", "MaxPool",
                                                  "AvgPool", "FusedBatchNormV3", "Reshape")])
    if n is not None:
      key = _pick(rng, sorted(n.attr))
      attr = n.attr[key]
      kind_of = attr.WhichOneof("value")
      if kind_of == "s":
        attr.s = bytes(rng.choice([b"NCHW", b"VALID", b"bogus", b""]))
      elif kind_of == "list" and len(attr.list.i):
        attr.list.i[int(rng.integers(0, len(attr.list.i)))] = int(rng.integers(-1, 5))
      elif kind_of == "b":
        attr.b = not attr.b
      elif kind_of == "f":
        attr.f = float(rng.choice([-1.0, 0.0, np.nan]))
  elif kind == "drop_node" and nodes:
    del gd.node[int(rng.integers(0, len(nodes)))]
  elif kind == "rename_input" and nodes:
    n = _pick(rng, [n for n in nodes if n.input])
    if n is not None:
      n.input[int(rng.integers(0, len(n.input)))] = f"missing_{int(rng.integers(0, 99))}"
  if text:
    return text_format.MessageToString(gd).encode("utf-8")
  return gd.SerializeToString()


def mutate(path: str, case: Case) -> None:
  """Mutates the model file at `path` in place (a copy of a seed model)."""
  rng = np.random.default_rng(case.seed)
  with open(path, "rb") as f:
    data = f.read()
  if case.mutation in BYTE_MUTATIONS:
    data = _mutate_bytes(data, case.mutation, rng)
  elif path.endswith(".onnx"):
    data = _mutate_onnx(data, case.mutation, rng)
  else:
    data = _mutate_tf(data, case.mutation, rng, path.endswith(".pbtxt"))
  with open(path, "wb") as f:
    f.write(data)


def run(case: Case, tmp: str) -> tuple[str, str]:
  """Runs pruning on the mutated model; returns (status, detail) with status
  "ok" (pruned and verified), "refused" (a GraphPruneError, nothing written) or
  "failed" (anything else: a traceback, a written file beside a refusal, an
  unverified output, a changed input)."""
  from graph_prune import errors  # pylint: disable=g-import-not-at-top
  from graph_prune import pipeline  # pylint: disable=g-import-not-at-top
  work = os.path.join(tmp, "work")
  os.makedirs(work, exist_ok=True)
  try:
    src = seed_model(case.seed_model, os.path.join(work, "model"))
    mutate(src, case)
  except Exception as e:  # pylint: disable=broad-except  (a mutation that cannot be built)
    return "skipped", f"mutation not applicable: {type(e).__name__}: {e}"[:200]
  with open(src, "rb") as f:
    digest = hashlib.sha256(f.read()).hexdigest()
  before = sorted(os.listdir(work))
  out = os.path.join(work, "out" + os.path.splitext(src)[1])
  try:
    doc = pipeline.prune(src, out, pipeline.Options(ratio=0.5))
  except errors.GraphPruneError as e:
    if sorted(os.listdir(work)) != before:
      return "failed", f"refused ({e}) but left {sorted(set(os.listdir(work)) - set(before))}"
    text = str(e)
    if "\n" in text:
      return "failed", f"refusal is not one line: {text[:300]!r}"
    return "refused", f"{type(e).__name__}: {text}"[:300]
  except Exception as e:  # pylint: disable=broad-except
    lines = traceback.format_exception(e)
    return "failed", (f"traceback: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                      f" | {''.join(lines[-4:])}").replace("\n", " ")[:700]
  finally:
    with open(src, "rb") as f:
      if hashlib.sha256(f.read()).hexdigest() != digest:
        return "failed", "the input file was changed"  # pylint: disable=lost-exception
  if not os.path.exists(out):
    return "failed", "exit 0 without an output file"
  if not doc.get("unchanged") and not (doc["verify"] and doc["verify"]["passed"]):
    return "failed", "exit 0 with an unverified output"
  return "ok", f"{doc['groups_pruned']} groups pruned"


def cases(seed: int, count: int) -> list[Case]:
  rng = np.random.default_rng(seed)
  return [Case(str(_pick(rng, SEEDS)), str(_pick(rng, MUTATIONS)), int(rng.integers(0, 2 ** 31)))
          for _ in range(count)]


def to_json(case: Case) -> str:
  return json.dumps(dataclasses.asdict(case), sort_keys=True)


def from_json(text: str) -> Case:
  return Case(**json.loads(text))
