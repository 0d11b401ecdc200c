"""Small PReLU networks written in plain PyTorch, as users write them, for
the tests (no prelu code in them)."""

import torch
from torch import nn


class Block(nn.Module):
    """A ResNet basic block with PReLUs; a 1x1 stride-2 shortcut when it
    changes the size."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.act1 = nn.PReLU(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.act2 = nn.PReLU(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.act1(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.act2(y + (x if self.down is None else self.down(x)))


class ResNet(nn.Module):
    """A small PReLU ResNet with its input normalisation inside forward."""

    def __init__(self, classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.act1 = nn.PReLU()
        self.layer1 = nn.Sequential(Block(8, 8, 1), Block(8, 16, 2))
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        x = (x - 0.5) / 0.25
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.layer1(x)
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)


class Vgg(nn.Module):
    """Sequential features and classifier: max and average pooling, a Leaky
    ReLU, a shared PReLU, Dropout, nn.Flatten, BatchNorm1d."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.PReLU(8),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.LeakyReLU(0.1),
            nn.AvgPool2d(2),
            nn.Conv2d(16, 16, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.PReLU(),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(0.5),
            nn.Linear(16 * 4 * 4, 32),
            nn.BatchNorm1d(32),
            nn.PReLU(32),
            nn.Linear(32, 10),
        )

    def forward(self, x):
        x = (x - 0.1307) / 0.3081
        return self.classifier(self.features(x))


class Mlp(nn.Module):
    """An MLP with a BatchNorm1d, PReLUs and a biased first layer."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(12, 16)
        self.bn = nn.BatchNorm1d(16)
        self.act = nn.PReLU(16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(self.act(self.bn(self.fc1(torch.flatten(x, 1)))))


def randomize(module, seed=0):
    """Random BatchNorm statistics and PReLU slopes (some steeper than 1 and
    negative), as training leaves them; evaluation mode."""
    g = torch.Generator().manual_seed(seed)

    def u(t, lo, hi):
        t.copy_(torch.rand(t.shape, generator=g) * (hi - lo) + lo)

    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                u(m.weight, 0.5, 1.5)
                u(m.bias, -0.2, 0.2)
                u(m.running_mean, -0.1, 0.1)
                u(m.running_var, 0.5, 2.0)
                m.num_batches_tracked.fill_(7)
            elif isinstance(m, nn.PReLU):
                u(m.weight, -1.5, 1.5)
    return module.eval()


def negative_shares(module, x):
    """Each PReLU's share of negative inputs over ``x``, by module path, from
    forward hooks on the module itself."""
    counts, hooks = {}, []
    for name, m in module.named_modules():
        if isinstance(m, nn.PReLU):

            def hook(_m, inp, name=name):
                neg, tot = counts.get(name, (0, 0))
                counts[name] = (neg + int((inp[0] < 0).sum()), tot + inp[0].numel())

            hooks.append(m.register_forward_pre_hook(hook))
    with torch.no_grad():
        module(x)
    for h in hooks:
        h.remove()
    return {k: n / t for k, (n, t) in counts.items()}
