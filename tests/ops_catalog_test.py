"""The op descriptions: the README's supported-ops table is generated from them and
must match; opset ranges never overlap; every description says what it does."""

import os

from absl.testing import absltest

from graph_prune.ops import catalog
from graph_prune.ops import onnx_ops
from graph_prune.ops import tf_ops


class CatalogTest(absltest.TestCase):

  def test_readme_table_is_generated_from_the_descriptions(self):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "README.md"), encoding="utf-8") as f:
      text = f.read()
    self.assertEqual(catalog.replace_in(text), text,
                     "README's supported-ops table is stale: run "
                     "python -m graph_prune.ops.catalog README.md")

  def test_lookup_respects_opset_ranges(self):
    self.assertIn("flattened", onnx_ops.REGISTRY.lookup("Softmax", 12).doc)
    self.assertIn("along axis", onnx_ops.REGISTRY.lookup("Softmax", 13).doc)
    self.assertIsNone(onnx_ops.REGISTRY.lookup("Reshape", 4))
    self.assertIsNotNone(tf_ops.REGISTRY.lookup("Conv3D"))

  def test_every_description_documents_itself(self):
    for registry in (tf_ops.REGISTRY, onnx_ops.REGISTRY):
      for d in registry.descriptions():
        self.assertGreater(len(d.doc), 10, d.ops)


if __name__ == "__main__":
  absltest.main()
