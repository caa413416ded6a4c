"""The paper-scale part of the grid (Basu et al. 2021, Sec. 5-6): full MNIST, full CIFAR-10 with
ResNet-18 / VGG-13, ImageNet with ResNet-50, and the 10 % MNIST subset of the small CNNs.

``catalog._build()`` appends ``paper_settings()``. Every setting here is far beyond the 2-core CI
budget: tier ``paper`` (one GPU or a cluster), except the 10 % MNIST subset (``standard``).

Training recipe. ``TrainSpec`` only knows the full-batch ``lbfgs+newton`` recipe today, and these
settings use it as written (it is what the rest of the grid, and the engine's warm Newton-CG
ground truth, assume): L-BFGS on the full-batch objective, with the Newton polish only where the
explicit Hessian fits (the 2.6k-parameter CNN); ``newton_steps=0`` elsewhere, as LeNet-5 in
``catalog``. The large models train in float32. For ResNet-18, VGG-13 and ResNet-50 full-batch
L-BFGS is not a realistic recipe (one step is a pass over the whole training set); once
``TrainSpec`` has minibatch SGD fields these settings should switch to the recipe named in each
description ("intended recipe"), which changes their spec hash, as it should.

Full MNIST / CIFAR-10 use the official split (``n_train`` = the whole training set, the official
test images as test set; see ``data.official_or_subset``). ImageNet cannot be held in memory as
the float tensors ``data.load_imagefolder`` makes (1.28 M x 3 x 224 x 224), so its setting is a
class-stratified subset of 10 training images per class, labelled ``imagenet10k``.
"""

from __future__ import annotations

from .settings import DataSpec, GroundTruthSpec, ModelSpec, Setting, TrainSpec, make_id

MNIST_FULL = DataSpec("mnist", n_train=60_000, n_test=10_000, layout="image")
# 10 % of MNIST's training images (Koh & Liang 2017's non-convex experiment), test points drawn from
# the remaining training images like the other MNIST subsets.
MNIST_10PCT = DataSpec("mnist", n_train=6_000, n_test=1_000, layout="image")
CIFAR10_FULL = DataSpec("cifar10", n_train=50_000, n_test=10_000, layout="image")
IMAGENET_10K = DataSpec("imagenet", n_train=10_000, n_test=1_000, layout="image", image_size=224)

# Warm Newton-CG ground truth as for the smaller CNNs (catalog.CNN_GROUND_TRUTH): 10
# Levenberg-Marquardt steps, damping at the weight-decay scale, <= 10 CG iterations each. Above
# engine.EXPLICIT_HESSIAN_MAX parameters it runs without a preconditioner.
PAPER_GROUND_TRUTH = GroundTruthSpec(max_steps=10, damping=1e-3, cg_iters=10)

# (family, parameters for 10 classes at the setting's input shape): checked by tests/test_grid_catalog.py
PARAMS = {"cnn": 2_616, "lenet5": 61_706, "resnet18": 11_173_962, "vgg13": 9_416_010,
          "resnet50": 25_557_032}  # resnet50: 1000 ImageNet classes


def _paper(label: str, data: DataSpec, family: str, wd: float, train: dict, description: str,
           tier: str = "paper") -> Setting:
    model = ModelSpec(family)
    return Setting(id=make_id(label, model, wd), tier=tier, data=data, model=model,
                   train=TrainSpec(weight_decay=wd, **train), ground_truth=PAPER_GROUND_TRUTH,
                   description=description)


# Existing fields only (see the module docstring): float32 and no Newton polish for the big models.
BIG = dict(dtype="float32", newton_steps=0)


def paper_settings() -> list[Setting]:
    out: list[Setting] = []
    for wd in (1e-3, 0.0):
        out.append(_paper("mnist", MNIST_FULL, "cnn", wd, {},
                          "Koh & Liang's all-conv tanh CNN (2,616 parameters) on full MNIST (official 60k/10k "
                          "split); full-batch L-BFGS + Newton polish"))
        out.append(_paper("mnist", MNIST_FULL, "lenet5", wd, dict(newton_steps=0),
                          "LeNet-5 (tanh, average pooling; 61,706 parameters) on full MNIST (official 60k/10k "
                          "split); full-batch L-BFGS, no Newton polish"))
        out.append(_paper("mnist6k", MNIST_10PCT, "cnn", wd, {},
                          "Koh & Liang's all-conv tanh CNN (2,616 parameters) on 10% of MNIST (6k training "
                          "digits, 1k test digits from the rest of the training set)", tier="standard"))
        out.append(_paper("mnist6k", MNIST_10PCT, "lenet5", wd, dict(newton_steps=0),
                          "LeNet-5 (61,706 parameters) on 10% of MNIST (6k training digits, 1k test digits "
                          "from the rest of the training set); no Newton polish", tier="standard"))
    for wd in (5e-4, 0.0):
        out.append(_paper("cifar10", CIFAR10_FULL, "resnet18", wd, BIG,
                          "ResNet-18 with a 3x3 stem, frozen BatchNorm (11,173,962 parameters) on full "
                          "CIFAR-10 (official 50k/10k split; the offline copy is JPEG-decoded). Full-batch "
                          "L-BFGS in float32 for now; intended recipe: SGD momentum 0.9, lr 0.1 cosine, "
                          "batch 128, 200 epochs"))
        out.append(_paper("cifar10", CIFAR10_FULL, "vgg13", wd, BIG,
                          "VGG-13-BN with global average pooling and one linear layer, frozen BatchNorm "
                          "(9,416,010 parameters) on full CIFAR-10 (official 50k/10k split). Full-batch "
                          "L-BFGS in float32 for now; intended recipe: SGD momentum 0.9, lr 0.05 cosine, "
                          "batch 128, 200 epochs"))
    out.append(_paper("imagenet10k", IMAGENET_10K, "resnet50", 1e-4, BIG,
                      "torchvision ResNet-50, frozen BatchNorm (25,557,032 parameters, 1000 classes) on a "
                      "class-stratified 10k-image subset of ILSVRC-2012 train (10 per class; 1k test images "
                      "from the rest), 224x224 centre crops. Optional start from user weights "
                      "(init_weights.py). Full-batch L-BFGS in float32 for now; intended recipe: "
                      "fine-tune with SGD momentum 0.9, lr 0.01, batch 256, 10 epochs"))
    return out
