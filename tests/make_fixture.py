"""Builds one Keras application fixture for the tests (run by a Bazel genrule).

Writes the frozen GraphDef and the SavedModel (zipped, since a genrule's outputs
are files) of keras_zoo.build(--arch), so that every test reading the same
architecture shares one build, cached by Bazel between runs.
"""

from absl import app
from absl import flags

from tests import keras_zoo

_ARCH = flags.DEFINE_string("arch", None, "Architecture from keras_zoo.ARCHITECTURES.",
                            required=True)
_OUT_PB = flags.DEFINE_string("out_pb", None, "Frozen GraphDef to write.", required=True)
_OUT_SM = flags.DEFINE_string("out_sm", None, "Zipped SavedModel to write.", required=True)


def main(argv):
  del argv
  keras_zoo.write_fixture(_ARCH.value, _OUT_PB.value, _OUT_SM.value)


if __name__ == "__main__":
  app.run(main)
