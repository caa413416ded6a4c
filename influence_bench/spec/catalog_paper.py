"""The paper-scale part of the grid (Basu et al. 2021, Sec. 5-6): full MNIST, full CIFAR-10 with
ResNet-18 / VGG-13, ImageNet with ResNet-50, and the 10 % MNIST subset of the small CNNs.

``catalog._build()`` appends ``paper_settings()``. Every setting here is far beyond the 2-core CI
budget: tier ``paper`` (one GPU or a cluster), except the 10 % MNIST subset (``standard``).

Training recipe: minibatch SGD with momentum 0.9 in float32 (constant learning rate: the recipe
has no schedule), ground truth `warm` minibatch retraining from theta* (``warm_epochs`` more epochs
of the same SGD without the removed point, minus a control run on the same batches) in 3
replicates, loo-fixed by default, as for the smoke CNNs in ``catalog``.

Full MNIST / CIFAR-10 use the official split (``n_train`` = the whole training set, the official
test images as test set; see ``data.official_or_subset``). ImageNet cannot be held in memory as
the float tensors ``data.load_imagefolder`` makes (1.28 M x 3 x 224 x 224), so its setting is a
class-stratified subset of 10 training images per class, labelled ``imagenet10k``.
"""

from __future__ import annotations

from influence_bench.spec.settings import (
    DataSpec,
    GroundTruthSpec,
    ModelSpec,
    ProtocolSpec,
    Setting,
    TrainSpec,
    make_id,
)

MNIST_FULL = DataSpec("mnist", n_train=60_000, n_test=10_000, layout="image")
# 10 % of MNIST's training images (Koh & Liang 2017's non-convex experiment), test points drawn from
# the remaining training images like the other MNIST subsets.
MNIST_10PCT = DataSpec("mnist", n_train=6_000, n_test=1_000, layout="image")
CIFAR10_FULL = DataSpec("cifar10", n_train=50_000, n_test=10_000, layout="image")
IMAGENET_10K = DataSpec("imagenet", n_train=10_000, n_test=1_000, layout="image", image_size=224)

# (family, parameters for 10 classes at the setting's input shape): checked by tests/test_grid_catalog.py
PARAMS = {"cnn": 2_616, "lenet5": 61_706, "resnet18": 11_173_962, "vgg13": 9_416_010,
          "resnet50": 25_557_032}  # resnet50: 1000 ImageNet classes


def minibatch_setting(label: str, data: DataSpec, family: str, wd: float, train: dict, description: str,
                      tier: str = "paper", warm_epochs: int = 2, replicates: int = 3) -> Setting:
    """A setting trained with minibatch SGD (momentum 0.9, float32, ``train``: lr, batch_size, epochs)
    whose ground truth is ``warm_epochs`` more epochs of the same SGD at a tenth of its learning rate
    (at the training rate the MNIST CNN's replicates agreed only to a noise ceiling of 0.26; at a
    tenth, 0.88), in ``replicates`` replicates, scored on loo-fixed by default."""
    model = ModelSpec(family)
    recipe = {"optimizer": "sgd", "lr": train["lr"], "momentum": 0.9, "batch_size": train["batch_size"],
              "epochs": train["epochs"], "dtype": "float32"}
    steps = warm_epochs * (data.n_train // recipe["batch_size"])
    gt = GroundTruthSpec(mode="warm", retrain="sgd", lr=recipe["lr"] / 10, momentum=0.9,
                         batch_size=recipe["batch_size"], steps=steps, replicates=replicates)
    return Setting(id=make_id(label, model, wd), tier=tier, data=data, model=model,
                   train=TrainSpec(weight_decay=wd, **recipe), ground_truth=gt,
                   protocol=ProtocolSpec(default=("loo-fixed",)), description=description)


SMALL_CNN = dict(lr=0.05, batch_size=100, epochs=30)  # the smoke CNNs' recipe too (catalog)
RESNET = dict(lr=0.05, batch_size=128, epochs=100)
IMAGENET = dict(lr=0.01, batch_size=64, epochs=10)


def paper_settings() -> list[Setting]:
    out: list[Setting] = []
    for wd in (1e-3, 0.0):
        out.append(minibatch_setting("mnist", MNIST_FULL, "cnn", wd, SMALL_CNN,
                          "Koh & Liang's all-conv tanh CNN (2,616 parameters) on full MNIST (official 60k/10k "
                          "split); SGD"))
        out.append(minibatch_setting("mnist", MNIST_FULL, "lenet5", wd, SMALL_CNN,
                          "LeNet-5 (tanh, average pooling; 61,706 parameters) on full MNIST (official 60k/10k "
                          "split); SGD"))
        out.append(minibatch_setting("mnist6k", MNIST_10PCT, "cnn", wd, SMALL_CNN,
                          "Koh & Liang's all-conv tanh CNN (2,616 parameters) on 10% of MNIST (6k training "
                          "digits, 1k test digits from the rest of the training set); SGD", tier="standard"))
        out.append(minibatch_setting("mnist6k", MNIST_10PCT, "lenet5", wd, SMALL_CNN,
                          "LeNet-5 (61,706 parameters) on 10% of MNIST (6k training digits, 1k test digits "
                          "from the rest of the training set); SGD", tier="standard"))
    for wd in (5e-4, 0.0):
        out.append(minibatch_setting("cifar10", CIFAR10_FULL, "resnet18", wd, RESNET,
                          "ResNet-18 with a 3x3 stem, frozen BatchNorm (11,173,962 parameters) on full "
                          "CIFAR-10 (official 50k/10k split; the offline copy is JPEG-decoded); SGD"))
        out.append(minibatch_setting("cifar10", CIFAR10_FULL, "vgg13", wd, RESNET,
                          "VGG-13-BN with global average pooling and one linear layer, frozen BatchNorm "
                          "(9,416,010 parameters) on full CIFAR-10 (official 50k/10k split); SGD"))
    out.append(minibatch_setting("imagenet10k", IMAGENET_10K, "resnet50", 1e-4, IMAGENET,
                      "torchvision ResNet-50, frozen BatchNorm (25,557,032 parameters, 1000 classes) on a "
                      "class-stratified 10k-image subset of ILSVRC-2012 train (10 per class; 1k test images "
                      "from the rest), 224x224 centre crops. Optional start from user weights "
                      "(init_weights.py); SGD fine-tuning", warm_epochs=1))
    return out
