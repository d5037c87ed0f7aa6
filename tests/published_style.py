"""An independent copy of the SCNet classes in the style of the paper's released scnet.py, used to
check that convert() recognises modules it did not create (same attributes, same forward)."""

import torch
import torch.nn as nn
import torch.nn.functional as F


class SCConv(nn.Module):
    def __init__(self, inplanes, planes, stride, padding, dilation, groups, pooling_r, norm_layer):
        super(SCConv, self).__init__()
        self.k2 = nn.Sequential(
            nn.AvgPool2d(kernel_size=pooling_r, stride=pooling_r),
            nn.Conv2d(inplanes, planes, kernel_size=3, stride=1, padding=padding, dilation=dilation,
                      groups=groups, bias=False),
            norm_layer(planes),
        )
        self.k3 = nn.Sequential(
            nn.Conv2d(inplanes, planes, kernel_size=3, stride=1, padding=padding, dilation=dilation,
                      groups=groups, bias=False),
            norm_layer(planes),
        )
        self.k4 = nn.Sequential(
            nn.Conv2d(inplanes, planes, kernel_size=3, stride=stride, padding=padding, dilation=dilation,
                      groups=groups, bias=False),
            norm_layer(planes),
        )

    def forward(self, x):
        identity = x
        out = torch.sigmoid(torch.add(identity, F.interpolate(self.k2(x), identity.size()[2:])))
        out = torch.mul(self.k3(x), out)
        out = self.k4(out)
        return out


class SCBottleneck(nn.Module):
    expansion = 4
    pooling_r = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, cardinality=1, bottleneck_width=32,
                 avd=False, dilation=1, is_first=False, norm_layer=None):
        super(SCBottleneck, self).__init__()
        group_width = int(planes * (bottleneck_width / 64.)) * cardinality
        self.conv1_a = nn.Conv2d(inplanes, group_width, kernel_size=1, bias=False)
        self.bn1_a = norm_layer(group_width)
        self.conv1_b = nn.Conv2d(inplanes, group_width, kernel_size=1, bias=False)
        self.bn1_b = norm_layer(group_width)
        self.avd = avd and (stride > 1 or is_first)
        if self.avd:
            self.avd_layer = nn.AvgPool2d(3, stride, padding=1)
            stride = 1
        self.k1 = nn.Sequential(
            nn.Conv2d(group_width, group_width, kernel_size=3, stride=stride, padding=dilation,
                      dilation=dilation, groups=cardinality, bias=False),
            norm_layer(group_width),
        )
        self.scconv = SCConv(group_width, group_width, stride=stride, padding=dilation, dilation=dilation,
                             groups=cardinality, pooling_r=self.pooling_r, norm_layer=norm_layer)
        self.conv3 = nn.Conv2d(group_width * 2, planes * 4, kernel_size=1, bias=False)
        self.bn3 = norm_layer(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.dilation = dilation
        self.stride = stride

    def forward(self, x):
        residual = x
        out_a = self.relu(self.bn1_a(self.conv1_a(x)))
        out_b = self.relu(self.bn1_b(self.conv1_b(x)))
        out_a = self.relu(self.k1(out_a))
        out_b = self.relu(self.scconv(out_b))
        if self.avd:
            out_a = self.avd_layer(out_a)
            out_b = self.avd_layer(out_b)
        out = self.bn3(self.conv3(torch.cat([out_a, out_b], dim=1)))
        if self.downsample is not None:
            residual = self.downsample(x)
        out += residual
        return self.relu(out)


class TinyNet(nn.Module):
    """Two bottlenecks and a head, assembled by hand (not through scnet_fused)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 64, 3, padding=1, bias=False)
        down = nn.Sequential(nn.Conv2d(64, 128, 1, stride=2, bias=False), nn.BatchNorm2d(128))
        self.blocks = nn.Sequential(
            SCBottleneck(64, 32, stride=2, downsample=down, avd=True, is_first=True, norm_layer=nn.BatchNorm2d),
            SCBottleneck(128, 32, norm_layer=nn.BatchNorm2d),
        )
        self.lone = SCConv(128, 128, 1, 1, 1, 1, 4, nn.BatchNorm2d)
        self.head = nn.Linear(128, 10)

    def forward(self, x):
        x = self.lone(self.blocks(self.stem(x)))
        return self.head(x.mean(dim=(2, 3)))
