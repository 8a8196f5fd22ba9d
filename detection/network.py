"""The bottom-up-attention Faster R-CNN (Anderson et al., CVPR 2018) that made VSRN's and LXMERT's features.

ResNet-101 C4 with frozen batch norm, an RPN on res4 (12 anchors), RoI pooling 14x14 at 1/16,
res5 on each region (stride 1, dilation 2, as the Visual Genome model has it) mean-pooled to the
region feature, heads for 1600 objects + background (last), class-specific boxes and 400
attributes + "no attribute" (last).

Module and parameter names are those of the published checkpoint (`unc-nlp/frcnn-vg-finetuned`,
`pytorch_model.bin`), and every width and depth is read off its shapes (detection.weights), so a
small state dict gives a small detector.

The checkpoint is a conversion of bottom-up-attention's Caffe model to detectron2's layout, and
how it was converted was never published. Three things are assumed, the only reading under which
the pipelines that load these weights, the LXMERT demo's and airsplay's detectron2 port (both
with detectron2's size-major anchors, a sigmoid objectness and the background last), find objects:
- the RPN's 12 anchor channels are size-major (detectron2's order), where Caffe's were
  ratio-major (py-faster-rcnn's generate_anchors); the caffe policy reorders them;
- the objectness is one logit per anchor, Caffe's foreground score minus its background score,
  so Caffe's two-way softmax is recovered from it (detection.caffe_ops.foreground_probability);
- the background is the last of the 1601 classes (Caffe's first), the rows of the class embedding
  that the attribute head looks up by the best class, background included, were permuted alike,
  and "no attribute" is the last of the 401 attribute outputs (Caffe's first).
`python3 extract_regions.py --check_against ROWS.tsv` (detection.check) tests them against rows
the Caffe pipeline published, for a user who holds the weights.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import FrozenBatchNorm2d, roi_pool

from detection.config import merged_config

# The published checkpoint's architecture, as detection.weights.architecture reads it off its state dict.
PUBLISHED_ARCH = {
    "stem": 64,
    "res2": (3, 64, 256),
    "res3": (4, 128, 512),
    "res4": (23, 256, 1024),
    "res5": (3, 512, 2048),
    "rpn_hidden": 512,
    "anchors": 12,
    "classes": 1600,
    "embedding": 256,
    "attr_hidden": 512,
    "attributes": 400,
}

FEATURE_STRIDE = 16
# Regions through res5 at once: bounds memory (a region's res5 activations are 1.6 MB in fp32).
# On the CPU, chunks of 16 keep each activation under glibc's mmap threshold, so that memory is
# reused instead of mapped afresh (a third less system time than 64, same compute).
RES5_CHUNK = {"cpu": 16, "cuda": 512}


class ConvNorm(nn.Conv2d):
    """A bias-free convolution followed by frozen batch norm (`NAME.weight`, `NAME.norm.*`)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1):
        super().__init__(
            in_channels, out_channels, kernel_size, stride=stride, padding=padding, dilation=dilation, bias=False
        )
        self.norm = FrozenBatchNorm2d(out_channels)

    def forward(self, x):
        return self.norm(super().forward(x))


class Bottleneck(nn.Module):
    """ResNet bottleneck with the stride in the first 1x1 convolution (as in the Caffe ResNets)."""

    def __init__(self, in_channels, width, out_channels, stride=1, dilation=1, shortcut=False):
        super().__init__()
        self.shortcut = ConvNorm(in_channels, out_channels, 1, stride) if shortcut else None
        self.conv1 = ConvNorm(in_channels, width, 1, stride)
        self.conv2 = ConvNorm(width, width, 3, padding=dilation, dilation=dilation)
        self.conv3 = ConvNorm(width, out_channels, 1)

    def forward(self, x):
        out = F.relu_(self.conv1(x))
        out = F.relu_(self.conv2(out))
        out = self.conv3(out)
        out += x if self.shortcut is None else self.shortcut(x)
        return F.relu_(out)


def resnet_stage(blocks, in_channels, width, out_channels, stride, dilation=1):
    layers = [Bottleneck(in_channels, width, out_channels, stride, dilation, shortcut=True)]
    layers += [Bottleneck(out_channels, width, out_channels, 1, dilation) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class Stem(nn.Module):
    def __init__(self, out_channels):
        super().__init__()
        self.conv1 = ConvNorm(3, out_channels, 7, stride=2, padding=3)

    def forward(self, x):
        # Caffe's pooling: no padding, ceil mode.
        return F.max_pool2d(F.relu_(self.conv1(x)), kernel_size=3, stride=2, padding=0, ceil_mode=True)


class Backbone(nn.Module):
    """Stem, res2, res3, res4: the image to res4 at 1/16."""

    def __init__(self, arch):
        super().__init__()
        self.stem = Stem(arch["stem"])
        channels = arch["stem"]
        for name, stride in (("res2", 1), ("res3", 2), ("res4", 2)):
            blocks, width, out = arch[name]
            setattr(self, name, resnet_stage(blocks, channels, width, out, stride))
            channels = out

    def forward(self, x):
        return self.res4(self.res3(self.res2(self.stem(x))))


class RPNHead(nn.Module):
    def __init__(self, in_channels, hidden, num_anchors):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, hidden, 3, padding=1)
        self.objectness_logits = nn.Conv2d(hidden, num_anchors, 1)
        self.anchor_deltas = nn.Conv2d(hidden, num_anchors * 4, 1)

    def forward(self, x):
        """(N, C, H, W) -> objectness logits (N, H*W*A) and deltas (N, H*W*A, 4): location-major, anchor-minor."""
        t = F.relu(self.conv(x))
        n, _, h, w = x.shape
        logits = self.objectness_logits(t).permute(0, 2, 3, 1).reshape(n, -1)
        deltas = self.anchor_deltas(t).view(n, -1, 4, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, 4)
        # Boxes are computed in fp32 also under autocast (bf16 would round them to pixels and more).
        return logits.float(), deltas.float()


class ProposalGenerator(nn.Module):
    def __init__(self, in_channels, hidden, num_anchors):
        super().__init__()
        self.rpn_head = RPNHead(in_channels, hidden, num_anchors)


class BoxPredictor(nn.Module):
    """Object logits, class-specific box deltas, and attribute logits conditioned on the best class."""

    def __init__(self, in_channels, num_classes, embedding, attr_hidden, num_attributes):
        super().__init__()
        self.cls_score = nn.Linear(in_channels, num_classes + 1)
        self.bbox_pred = nn.Linear(in_channels, num_classes * 4)
        self.cls_embedding = nn.Embedding(num_classes + 1, embedding)
        self.fc_attr = nn.Linear(in_channels + embedding, attr_hidden)
        self.attr_score = nn.Linear(attr_hidden, num_attributes + 1)

    def forward(self, features):
        """(R, D) -> object logits (R, C+1, background last), attribute logits (R, A+1, none last)."""
        obj_logits = self.cls_score(features)
        # The class embedding of the best class, background included, as the Caffe net's ArgMax
        # (its rows assumed permuted with the classes: see above).
        embedded = self.cls_embedding(obj_logits.argmax(dim=1))
        attr_logits = self.attr_score(F.relu(self.fc_attr(torch.cat([features, embedded], dim=1))))
        return obj_logits, attr_logits

    def box_deltas(self, features, classes):
        """The box deltas (R, 4) of one class per region, without computing all the others."""
        weight = self.bbox_pred.weight.view(-1, 4, features.shape[1])[classes]
        bias = self.bbox_pred.bias.view(-1, 4)[classes]
        return (torch.einsum("rd,rkd->rk", features, weight) + bias).float()


class ROIHeads(nn.Module):
    def __init__(self, arch, res5_halve=False):
        super().__init__()
        blocks, width, out = arch["res5"]
        # The Visual Genome model keeps res5 at 14x14: stride 1 and dilation 2 (unless res5halve).
        stride, dilation = (2, 1) if res5_halve else (1, 2)
        self.res5 = resnet_stage(blocks, arch["res4"][2], width, out, stride, dilation)
        self.box_predictor = BoxPredictor(
            out, arch["classes"], arch["embedding"], arch["attr_hidden"], arch["attributes"]
        )


class BottomUpDetector(nn.Module):
    """The network; `extract_regions` runs it. Build it with `load_detector`."""

    def __init__(self, arch, config=None):
        super().__init__()
        self.config = merged_config(config)
        self.arch = arch
        self.backbone = Backbone(arch)
        self.proposal_generator = ProposalGenerator(arch["res4"][2], arch["rpn_hidden"], arch["anchors"])
        self.roi_heads = ROIHeads(arch, self.config["roi_box_head"]["res5halve"])
        self.pooler_resolution = int(self.config["roi_box_head"]["pooler_resolution"])

    @property
    def device(self):
        return self.backbone.stem.conv1.weight.device

    def region_features(self, res4, rois):
        """RoI-pooled res4 (rois: (R, 5) batch index, x1 y1 x2 y2 in network-input pixels) -> (R, D)."""
        pooled = roi_pool(res4, rois, self.pooler_resolution, 1.0 / FEATURE_STRIDE)
        return self.res5_mean(pooled)

    def res5_mean(self, pooled):
        """res5 on each pooled region, then the mean over its positions; in chunks to bound memory."""
        chunk = RES5_CHUNK.get(pooled.device.type, RES5_CHUNK["cpu"])
        res5 = self.roi_heads.res5
        out = [res5(part).mean(dim=(2, 3)) for part in pooled.split(chunk)] if len(pooled) else []
        return torch.cat(out) if out else pooled.new_zeros((0, self.arch["res5"][2]))
