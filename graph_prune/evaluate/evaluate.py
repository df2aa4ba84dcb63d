"""Evaluates a classifier on labelled data: top-1/top-5 accuracy, and agreement with a
reference model (the same model before pruning, or its ONNX export).

Models are read with the format adapters' `load` and run with their `Runner`, so
inputs and outputs are found exactly as the pruning tool finds them. Samples come
from graph_prune.data as NHWC images; each model gets them in its own layout
(NCHW ONNX inputs are transposed) and dtype.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from typing import Any, Optional

import numpy as np

from graph_prune import errors
from graph_prune import lazy
from graph_prune import files
from graph_prune import formats
from graph_prune.data import layout as layout_lib
from graph_prune.data import preprocess as preprocess_lib
from graph_prune.data import sources
from graph_prune.evaluate import metrics

# Only for tf.errors: the data pipeline (tf.data) reports what it could not read with them.
tf = lazy.module("tensorflow")

NHWC, NCHW = layout_lib.NHWC, layout_lib.NCHW


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """Which model to run, and which of its tensors."""
  path: str
  signature: Optional[str] = None  # SavedModel signature (default serving_default)
  input: Optional[str] = None      # the tensor fed with samples (default: the only input)
  output: Optional[str] = None     # the scores [N, classes] (default: the only output)
  layout: str = "auto"             # of a rank-4 input: auto, NHWC or NCHW


@dataclasses.dataclass(frozen=True)
class Options:
  reference: Optional[ModelSpec] = None
  report: Optional[str] = None
  data_format: str = "auto"
  data_dir: Optional[str] = None   # Fashion-MNIST directory for 'fashion-mnist:SPLIT'
  split: str = "test"              # IDX split of a directory
  image_key: str = sources.IMAGE_KEY
  label_key: str = sources.LABEL_KEY
  preprocess: preprocess_lib.Preprocess = preprocess_lib.Preprocess()
  batch_size: int = 256
  max_samples: int = 0             # 0: all


@dataclasses.dataclass(frozen=True)
class _Model:
  spec: ModelSpec
  format: str
  runner: Any
  input: str
  input_shape: Optional[tuple[Optional[int], ...]]  # as the model declares it
  dtype: str
  layout: str    # NHWC, NCHW, or "" for an input that is not a rank-4 image
  output: str
  output_index: int
  output_key: Optional[str] = None  # SavedModel signature output key
  signature: Optional[str] = None

  @property
  def sample_shape(self) -> Optional[tuple[Optional[int], ...]]:
    """One sample as the data pipeline makes it: [H, W, C] for images."""
    if self.input_shape is None:
      return None
    s = self.input_shape
    return layout_lib.image_shape(s, self.layout)

  def describe(self) -> dict:
    return {"path": self.spec.path, "format": self.format, "input": self.input,
            "input_shape": _shape_json(self.input_shape), "dtype": self.dtype,
            "layout": self.layout or None, "output": self.output,
            "output_key": self.output_key, "signature": self.signature}


def _shape_json(shape):
  return None if shape is None else [d if d is not None else -1 for d in shape]


def _shape_text(shape) -> str:
  return "?" if shape is None else "[" + ",".join("?" if d is None else str(d) for d in shape) + "]"


def _open(spec: ModelSpec, data_shape=None) -> _Model:
  """Loads the model; `data_shape`, the data's static [H, W, C] if known, helps to
  tell an ONNX input's layout."""
  fmt = formats.for_path(spec.path)
  adapter = fmt.adapter
  if spec.layout not in ("auto", NHWC, NCHW):
    raise errors.UsageError(f"--layout '{spec.layout}' is not auto, NHWC or NCHW")
  outputs = (spec.output,) if spec.output and not os.path.isdir(spec.path) else ()
  model = formats.ModelRef(spec.path, spec.signature, (spec.input,) if spec.input else (),
                           outputs).load()
  if len(model.inputs) != 1:
    raise errors.UsageError(f"model '{spec.path}' has {len(model.inputs)} inputs "
                            f"({', '.join(model.inputs)}); evaluation feeds one: pick it with "
                            "--input")
  names = list(model.outputs)
  signature = getattr(model, "signature", None)
  keys = [k for k, _ in signature.outputs] if signature else names
  if spec.output:
    matches = [i for i, (k, n) in enumerate(zip(keys, names))
               if spec.output in (k, n, n.split(":")[0])]
    if not matches:
      raise errors.UsageError(f"model '{spec.path}' has no output '{spec.output}'; it has: "
                              f"{', '.join(keys)}")
    index = matches[0]
  elif len(names) == 1:
    index = 0
  else:
    raise errors.UsageError(f"model '{spec.path}' has {len(names)} outputs ({', '.join(keys)}); "
                            "pick the class scores with --output")
  view = adapter.to_view(model)
  name = model.inputs[0]
  shape = view.shape(name)
  shape = tuple(shape) if shape is not None else None
  layout = ""
  if shape is not None and len(shape) == 4:
    layout = (spec.layout if spec.layout != "auto"
              else layout_lib.detect(fmt, view, name, shape, data_shape))
  kind = model.kind if fmt.name != formats.ONNX else formats.ONNX
  return _Model(spec, kind, adapter.Runner(model), name, shape, view.dtypes.get(name, "float32"),
                layout, names[index], index, keys[index] if signature else None,
                signature.name if signature else None)


def _misfit(got, model: _Model, data_spec: str) -> str:
  want = model.sample_shape
  what = "[H, W, C] " if model.layout else ""
  msg = (f"data '{data_spec}' gives samples of shape {_shape_text(got)}, but model "
         f"'{model.spec.path}' takes {what}{_shape_text(want)}")
  if model.layout and len(got) == 3 and got[2] != want[2] and None not in (got[2], want[2]):
    return msg + (f": the images have {got[2]} channel(s), the model takes {want[2]}; "
                  "give images with the model's channel count")
  if model.layout and len(got) == 3:
    return msg + "; give --resize=H,W to fit the images to the model"
  return msg


def _feed(model: _Model, batch: np.ndarray) -> np.ndarray:
  return layout_lib.to_model(batch, model.layout, model.dtype)


def _scores(model: _Model, batch: np.ndarray) -> np.ndarray:
  """The model's class scores [N, K]; a fixed batch dimension is fed in chunks."""
  x = _feed(model, batch)
  fixed = model.input_shape[0] if model.input_shape else None
  step = fixed if fixed else len(x)
  outs = []
  for start in range(0, len(x), step):
    chunk = x[start:start + step]
    pad = step - len(chunk)
    if pad:  # the model takes exactly `step` samples: pad, then drop the padding's outputs
      chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
    try:
      out = np.asarray(model.runner([chunk])[model.output_index])
    except Exception as e:  # TensorFlow and ONNX Runtime raise many types.
      raise errors.InputError(f"running '{model.spec.path}' failed "
                              f"({str(e).strip().splitlines()[0][:300]})") from None
    outs.append(out[:len(out) - pad] if pad else out)
  out = np.concatenate(outs)
  if out.ndim > 2 and out.shape[0] and max(out.shape[1:]) == int(np.prod(out.shape[1:])):
    out = out.reshape(len(out), -1)  # [N, 1, 1, K] classifier heads
  if out.ndim != 2 or out.shape[0] != len(batch):
    raise errors.UsageError(f"output '{model.output}' of '{model.spec.path}' has shape "
                            f"{list(out.shape)}, not [N, classes]; pick the class scores "
                            "with --output")
  return out


_SHAPE_ERROR = re.compile(r"Shape of tensor .* \[([\d,]*)\] is not compatible with expected "
                          r"shape \[([\d,?]*)\]")


def _data_error(e: tf.errors.OpError, data_spec: str, model: _Model,
                options: Options) -> errors.InputError:
  """One line for an error met while reading the data."""
  msg = e.message.strip().splitlines()[0] if e.message.strip() else type(e).__name__
  msg = re.sub(r"\s*\[Op:\w+\]( name: \S*)?$", "", msg)
  match = _SHAPE_ERROR.search(msg)
  if match:
    got = tuple(int(d) for d in match.group(1).split(",") if d)
    return errors.InputError(_misfit(got, model, data_spec))
  if "is required but could not be found" in msg:
    msg += (f"; name the feature keys with --image_key/--label_key (now "
            f"'{options.image_key}', '{options.label_key}')")
  return errors.InputError(f"reading data '{data_spec}' failed: {msg}")


def _check_report_path(path: Optional[str]) -> None:
  if not path:
    return
  if os.path.isdir(path):
    raise errors.UsageError(f"--report '{path}' is a directory; give a file name")
  parent = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(parent):
    raise errors.UsageError(f"directory of --report '{path}' does not exist")


def evaluate(model_spec: ModelSpec, data_spec: str, options: Options = Options()) -> dict:
  """Runs the model (and the reference) over the data; returns the report and writes it
  to options.report. On any error nothing is written."""
  start = time.perf_counter()
  _check_report_path(options.report)
  source = sources.resolve(data_spec, options.data_format, options.data_dir, options.split)
  examples = sources.examples(source, options.image_key, options.label_key)
  prep = options.preprocess
  got = examples.sample_shape
  if got is not None and prep.resize and len(got) == 3:
    got = tuple(prep.resize) + got[2:]
  model = _open(model_spec, got if examples.images else None)
  reference = None
  try:
    if options.reference:
      reference = _open(options.reference, got if examples.images else None)
    want = model.sample_shape
    if examples.images and want is not None and len(want) == 3:
      channels = want[2]
    else:
      channels = examples.sample_shape[-1] if examples.sample_shape else None
    preprocess_lib.check(prep, channels, examples.images)
    if got is not None and want is not None and not layout_lib.fits(got, want):
      raise errors.InputError(_misfit(got, model, data_spec))
    ds = preprocess_lib.batches(examples, prep, options.batch_size, want, options.max_samples)
    load_s = time.perf_counter() - start
    doc = _measure(model, reference, ds, data_spec, options)
  finally:
    model.runner.close()
    if reference:
      reference.runner.close()
  doc["data"] = dict(source.to_json(), preprocess=prep.to_json(),
                     max_samples=options.max_samples)
  doc["timings"].update(load_s=round(load_s, 3), total_s=round(time.perf_counter() - start, 3))
  if options.report:
    files.write_json(options.report, doc, indent=2)
  return doc


def _measure(model: _Model, reference: Optional[_Model], ds: tf.data.Dataset, data_spec: str,
             options: Options) -> dict:
  """Accuracy (and agreement) over all batches; the report without data and load time."""
  accuracy, agreement = metrics.AccuracyCounter(), metrics.AgreementCounter()
  classes = None
  model_s = reference_s = 0.0
  eval_start = time.perf_counter()
  batches = ds.as_numpy_iterator()
  while True:
    try:
      x, labels = next(batches)
    except StopIteration:
      break
    except tf.errors.OpError as e:
      raise _data_error(e, data_spec, model, options) from None
    t = time.perf_counter()
    scores = _scores(model, x)
    model_s += time.perf_counter() - t
    classes = scores.shape[1]
    bad = labels[(labels < 0) | (labels >= classes)]
    if bad.size:
      raise errors.InputError(f"data '{data_spec}' has label {int(bad[0])}, but model "
                              f"'{model.spec.path}' scores {classes} classes (labels "
                              f"0..{classes - 1})")
    accuracy.add(scores, labels)
    if reference:
      if (reference.sample_shape is not None and
          not layout_lib.fits(x.shape[1:], reference.sample_shape)):
        raise errors.UsageError(f"reference '{reference.spec.path}' takes "
                                f"{_shape_text(reference.sample_shape)} samples, but the data "
                                f"gives {_shape_text(x.shape[1:])}")
      t = time.perf_counter()
      ref_scores = _scores(reference, x)
      reference_s += time.perf_counter() - t
      if ref_scores.shape[1] != classes:
        raise errors.UsageError(f"reference '{reference.spec.path}' scores "
                                f"{ref_scores.shape[1]} classes, the model {classes}")
      agreement.add(scores, ref_scores)
  eval_s = time.perf_counter() - eval_start
  result = accuracy.result()
  if result.samples == 0:
    raise errors.InputError(f"data '{data_spec}' has no samples; the dataset is empty")
  doc = {
      "model": model.describe(),
      "samples": result.samples, "classes": classes,
      "top1": result.top1, "top5": result.top5, "top5_k": result.k,
      "timings": {"eval_s": round(eval_s, 3), "model_s": round(model_s, 3),
                  "samples_per_s": round(result.samples / eval_s, 1) if eval_s else None},
  }
  if reference:
    doc["reference"] = reference.describe()
    doc["agreement"] = dataclasses.asdict(agreement.result())
    doc["timings"]["reference_s"] = round(reference_s, 3)
  return doc


def text(doc: dict) -> str:
  """The report as a small table for stdout."""
  m, d, t = doc["model"], doc["data"], doc["timings"]

  def describe(info):
    layout = f" {info['layout']}" if info["layout"] else ""
    return (f"{info['path']} ({info['format']}; {info['input']}{layout} "
            f"{_shape_text([None if v == -1 else v for v in info['input_shape'] or []])} "
            f"{info['dtype']} -> {info['output_key'] or info['output']})")

  rows = [("model", describe(m)),
          ("data", f"{d['spec']} ({d['format']})"),
          ("samples", f"{doc['samples']} ({doc['classes']} classes)"),
          ("top-1", f"{doc['top1']:.4f}"),
          (f"top-{doc['top5_k']}", f"{doc['top5']:.4f}")]
  if "agreement" in doc:
    a = doc["agreement"]
    rows += [("reference", describe(doc["reference"])),
             ("agreement", f"top-1 {a['top1']:.4f}, mean KL {a['mean_kl']:.3g}, "
                           f"max |diff| {a['max_abs_diff']:.3g}")]
  rate = f", {t['samples_per_s']:.0f} samples/s" if t["samples_per_s"] else ""
  rows.append(("time", f"load {t['load_s']:.2f} s, evaluate {t['eval_s']:.2f} s "
                       f"(model {t['model_s']:.2f} s{rate}), total {t['total_s']:.2f} s"))
  width = max(len(k) for k, _ in rows)
  return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
