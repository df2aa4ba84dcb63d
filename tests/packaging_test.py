"""pip install: pyproject.toml's dependencies are the pins of
third_party/requirements.txt, and the package installed into a fresh virtual
environment gives a working `graph-prune` command."""

import os
import shutil
import site
import subprocess
import sys
import tomllib

from absl.testing import absltest
import onnx

from tests import binaries
from tests import onnx_net

_ROOT = binaries.ROOT


def _pins() -> dict[str, str]:
  out = {}
  with open(os.path.join(_ROOT, "third_party", "requirements.txt"), encoding="utf-8") as f:
    for line in f:
      line = line.split("#")[0].strip()
      if line:
        name = line.split("=")[0].split(">")[0].split("<")[0]
        out[name] = line
  return out


class PackagingTest(absltest.TestCase):

  def test_dependencies_are_the_pins(self):
    with open(os.path.join(_ROOT, "pyproject.toml"), "rb") as f:
      deps = tomllib.load(f)["project"]["dependencies"]
    pins = _pins()
    for dep in deps:
      name = dep.split("=")[0].split(">")[0].split("<")[0]
      self.assertEqual(dep, pins.get(name), f"{name}: pyproject.toml and requirements.txt differ")
    # What the package imports at run time is all there.
    for needed in ("tensorflow-cpu", "tf2onnx", "onnx", "onnxruntime", "numpy", "absl-py"):
      self.assertIn(needed, [d.split("=")[0].split(">")[0] for d in deps])

  def test_pip_install_into_a_fresh_venv(self):
    tmp = self.create_tempdir().full_path
    src = os.path.join(tmp, "src")
    os.makedirs(src)
    for name in ("pyproject.toml", "README.md"):
      shutil.copy(os.path.join(_ROOT, name), src)
    for package in ("graph_prune", "tools"):
      shutil.copytree(os.path.join(_ROOT, package), os.path.join(src, package),
                      ignore=shutil.ignore_patterns("__pycache__", "BUILD"))
    env_dir = os.path.join(tmp, "env")
    subprocess.run([sys.executable, "-m", "venv", env_dir], check=True)
    py = os.path.join(env_dir, "bin", "python")
    # No network: the dependencies come from this interpreter's site-packages (a
    # .pth file), the package itself is built and installed from the copy.
    purelib = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    with open(os.path.join(purelib, "deps.pth"), "w", encoding="utf-8") as f:
      f.write("\n".join(site.getsitepackages()) + "\n")
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    clean["TF_CPP_MIN_LOG_LEVEL"] = "3"
    res = subprocess.run([py, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                          "--no-index", "--quiet", src], capture_output=True, text=True,
                         env=clean, cwd=tmp, check=False)
    self.assertEqual(res.returncode, 0, res.stderr[-3000:])
    shutil.rmtree(src)   # the installed copy must stand on its own
    command = os.path.join(env_dir, "bin", "graph-prune")
    model = os.path.join(tmp, "m.onnx")
    net = onnx_net.Net(0)
    h = net.op("Relu", [net.conv("x", 3, 8)])
    onnx.save(net.model(net.conv(h, 8, 4), [4, 8, 8]), model)
    out = os.path.join(tmp, "pruned.onnx")
    res = subprocess.run([command, "prune", f"--in={model}", f"--out={out}", "--ratio=0.5"],
                         capture_output=True, text=True, env=clean, cwd=tmp, check=False)
    self.assertEqual(res.returncode, 0, res.stderr[-3000:])
    self.assertIn("verification: PASSED", res.stdout)
    self.assertTrue(os.path.isfile(out))
    where = subprocess.run([py, "-c", "import graph_prune, os; print(graph_prune.__file__)"],
                           capture_output=True, text=True, env=clean, cwd=tmp, check=True)
    self.assertTrue(where.stdout.strip().startswith(env_dir), where.stdout)
    # Same exit codes as the tools: bad input is 2, an unknown subcommand too.
    res = subprocess.run([command, "prune", f"--in={model}", f"--out={out}"],
                         capture_output=True, text=True, env=clean, cwd=tmp, check=False)
    self.assertEqual(res.returncode, 2)
    self.assertIn("pass --overwrite", res.stderr)
    res = subprocess.run([command, "frobnicate"], capture_output=True, text=True, env=clean,
                         cwd=tmp, check=False)
    self.assertEqual(res.returncode, 2)
    self.assertIn("unknown subcommand 'frobnicate'", res.stderr)


if __name__ == "__main__":
  absltest.main()
