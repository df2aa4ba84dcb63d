"""Exports ShuffleNet V2 (x0.5, the torchvision architecture, written out here
without torchvision) from PyTorch to ONNX, for //tests:shufflenet_test.

  pip install torch==2.13.0 onnx  # in a separate environment: torch is not a pin
  python tests/data/export_torch_shufflenet.py tests/data/torch_shufflenet_v2.onnx

The weights go to an external data file that is not kept: the test fills every
weight with seeded random values, so the repository holds the structure only
(torch's channel split is Split or Slice, the shuffle Reshape-Transpose-Reshape,
batch norm BatchNormalization, as torch.onnx writes them).
"""

import os
import sys

import onnx
import torch
from torch import nn


def _channel_shuffle(x, groups):
  n, c, h, w = x.shape
  x = x.reshape(n, groups, c // groups, h, w).transpose(1, 2).contiguous()
  return x.reshape(n, c, h, w)


class _Block(nn.Module):

  def __init__(self, cin, cout, stride):
    super().__init__()
    self.stride = stride
    half = cout // 2
    if stride > 1:
      self.branch1 = nn.Sequential(
          nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin),
          nn.Conv2d(cin, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(inplace=True))
    else:
      self.branch1 = nn.Sequential()
    first = cin if stride > 1 else half
    self.branch2 = nn.Sequential(
        nn.Conv2d(first, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(inplace=True),
        nn.Conv2d(half, half, 3, stride, 1, groups=half, bias=False), nn.BatchNorm2d(half),
        nn.Conv2d(half, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(inplace=True))

  def forward(self, x):
    if self.stride == 1:
      a, b = x.chunk(2, dim=1)
      out = torch.cat((a, self.branch2(b)), dim=1)
    else:
      out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
    return _channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
  """torchvision's shufflenet_v2_x0_5 layout: stages of 4, 8, 4 blocks."""

  def __init__(self, widths=(24, 48, 96, 192, 1024), repeats=(4, 8, 4), classes=1000):
    super().__init__()
    self.conv1 = nn.Sequential(nn.Conv2d(3, widths[0], 3, 2, 1, bias=False),
                               nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    stages, cin = [], widths[0]
    for cout, n in zip(widths[1:4], repeats):
      stages += [_Block(cin, cout, 2)] + [_Block(cout, cout, 1) for _ in range(n - 1)]
      cin = cout
    self.stages = nn.Sequential(*stages)
    self.conv5 = nn.Sequential(nn.Conv2d(cin, widths[4], 1, bias=False),
                               nn.BatchNorm2d(widths[4]), nn.ReLU(inplace=True))
    self.fc = nn.Linear(widths[4], classes)

  def forward(self, x):
    x = self.conv5(self.stages(self.maxpool(self.conv1(x))))
    return self.fc(x.mean([2, 3]))


def main(path):
  torch.manual_seed(0)
  model = ShuffleNetV2().eval()
  x = torch.randn(1, 3, 224, 224)
  tmp = path + ".full.onnx"
  torch.onnx.export(model, (x,), tmp, opset_version=13, input_names=["input"],
                    output_names=["logits"], dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
                    dynamo=False)
  proto = onnx.load(tmp)
  os.remove(tmp)
  onnx.save_model(proto, path, save_as_external_data=True, all_tensors_to_one_file=True,
                  location=os.path.basename(path) + ".weights", size_threshold=64)
  os.remove(path + ".weights")   # the structure only: the test fills the weights


if __name__ == "__main__":
  main(sys.argv[1])
