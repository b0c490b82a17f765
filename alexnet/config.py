"""Typed configuration of the two-column network (the model's own section of a job config)."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any

LRN_CONVENTIONS = ("paper", "per_size")
VARIANTS = ("paper", "small")
# The paper's findings as switches (README "The paper's findings"); the first of each is the paper's.
ACTIVATIONS = ("relu", "tanh")  # section 3.1
# section 3.4: max-pool windows z=3 at stride s=2 ("overlapping") or z=2, s=2 ("non_overlapping")
POOLINGS = {"overlapping": (3, 2), "non_overlapping": (2, 2)}
REMOVABLE_BLOCKS = ("conv3", "conv4")  # section 6: "removing any of the middle layers" (depth)

# The paper's crop: 224 (227 here, see ModelConfig) of the 256 px images it stored.
CROP_FRACTION = 227 / 256


@dataclass(frozen=True)
class ModelConfig:
    """Sizes and constants of the two-column AlexNet.

    The defaults are the 2012 paper's network at 1000 classes. Channel and unit
    counts are **per column**; the paper's network has two columns (the paper's two
    GPUs), whether they run in one process or on two ranks (``columns`` = 1: the
    one-column comparison net, below).

    Input size: the paper says 224, but conv1 (11x11, stride 4) only yields the
    paper's 55x55 maps from 227 pixels ((227 - 11) / 4 + 1 = 55). The original
    cuda-convnet code got there by padding the 224 crop; we take 227x227 crops
    with no padding (as Caffe's reference model does), which gives the same 55x55x48
    maps per column and the same 60,965,224 parameters.

    LRN convention: ``"per_size"`` (default) is the network as it was trained,
    b = a / (k + (alpha / n) * sum a^2)^beta: cuda-convnet's ``layer.py`` divides the
    layer's ``scale`` by its ``size`` before the kernel sees it, Caffe's AlexNet
    (``lrn_param { local_size: 5 alpha: 0.0001 }``) divides by ``local_size`` too, and so
    does ``torch.nn.LocalResponseNorm``. ``"paper"`` is the formula as section 3.3 prints
    it, b = a / (k + alpha * sum a^2)^beta, five times stronger: with activations near 100
    its factor is 0.23 where the trained network's is 0.44.

    Initialisation (:func:`alexnet.model.init_column_params`): the weights of the layers a
    ReLU follows ~ N(0, ``init_std``), those of the logits layer fc8 ~ N(0, ``fc8_init_std``)
    (both the paper's 0.01; 0 means He, sqrt(2 / fan_in)), and the biases of conv2, conv4,
    conv5, fc6 and fc7 = ``init_bias`` (the paper's 1; the others 0).
    """

    num_classes: int = 1000
    input_size: int = 227
    in_channels: int = 3
    conv_channels: tuple[int, int, int, int, int] = (48, 128, 192, 192, 128)
    fc_units: int = 2048
    conv1_kernel: int = 11
    conv1_stride: int = 4
    conv1_padding: int = 0
    conv2_kernel: int = 5
    lrn_size: int = 5
    lrn_k: float = 2.0
    lrn_alpha: float = 1e-4
    lrn_beta: float = 0.75
    lrn_convention: str = "per_size"
    dropout: float = 0.5
    init_std: float = 0.01
    fc8_init_std: float = 0.01
    init_bias: float = 1.0
    seed: int = 0
    activation: str = "relu"
    pooling: str = "overlapping"
    lrn: bool = True
    columns: int = 2
    remove_blocks: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"model.activation={self.activation!r}: use one of {ACTIVATIONS}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"model.pooling={self.pooling!r}: use one of {tuple(POOLINGS)}")
        if self.columns not in (1, 2):
            raise ValueError(
                f"model.columns={self.columns!r}: use 2 (the paper's two-column net) or 1 (the "
                "one-column net of the paper's section 3.2)"
            )
        removed = tuple(self.remove_blocks)
        if any(b not in REMOVABLE_BLOCKS for b in removed) or len(set(removed)) != len(removed):
            raise ValueError(
                f"model.remove_blocks={list(removed)}: give distinct blocks among {list(REMOVABLE_BLOCKS)} "
                "(the middle conv layers; [] keeps all eight blocks)"
            )
        # canonical order, so that two spellings of one net compare (and key checkpoints) equal
        object.__setattr__(self, "remove_blocks", tuple(b for b in REMOVABLE_BLOCKS if b in removed))
        if self.num_classes < 2:
            raise ValueError(f"model.num_classes={self.num_classes}: need at least 2 classes")
        if self.lrn_convention not in LRN_CONVENTIONS:
            raise ValueError(f"model.lrn_convention={self.lrn_convention!r}: use one of {LRN_CONVENTIONS}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout={self.dropout}: must be in [0, 1)")
        if len(self.conv_channels) != 5 or min(self.conv_channels) < 1:
            raise ValueError(f"model.conv_channels={self.conv_channels}: give 5 positive per-column widths")
        if self.fc_units < 1:
            raise ValueError(f"model.fc_units={self.fc_units}: must be positive")
        if self.spatial_sizes()[-1] < 1:
            raise ValueError(
                f"model.input_size={self.input_size} is too small for conv1 "
                f"(kernel {self.conv1_kernel}, stride {self.conv1_stride}) and three "
                f"{'/'.join(map(str, self.pool_window))} pools; "
                "use ModelConfig.small() for 32-64 px images"
            )

    @classmethod
    def small(cls, num_classes: int = 10, input_size: int = 32, **overrides) -> ModelConfig:
        """The small-image variant: same eight blocks and exchange points, narrower.

        For 32-64 px inputs (CIFAR- or MNIST-sized; up to 191 px, where conv1's stride
        ``input_size // 32`` would pass its 5 px kernel and skip pixels). conv1 becomes 5x5
        with that stride so that the three 3/2 max-pools leave 3x3 to 6x6 maps before fc6.

        A start a reader expects, loss ~ ln(num_classes): N(0, 0.01) on a narrow net starves
        the gradient for hundreds of steps, so the layers a ReLU follows are He-initialised
        (their activations keep their scale, layer after layer), with biases 0: the paper's
        bias 1 was sized for its N(0, 0.01) activations and, under He, adds a mean that grows
        through the layers (activation rms 1.1 -> 3.6 -> 9.1, logits std 14, loss ~20 on 10
        classes). fc8, linear, keeps the paper's N(0, 0.01), so the first logits are small.
        """
        if input_size < 32:
            raise ValueError(
                f"model.input_size={input_size}: the small variant needs >= 32 px "
                "(store small images with `alexnet shards --size 36`: 32 px crops)"
            )
        if input_size // 32 > 5:
            raise ValueError(
                f"model.input_size={input_size}: the small variant is for 32-64 px images (its 5x5 conv1 "
                f'at stride {input_size // 32} would skip pixels); use model.variant="paper", or store '
                "the images smaller (`alexnet shards --size 36`: 32 px crops; --size 72: 64 px)"
            )
        params = dict(
            num_classes=num_classes,
            input_size=input_size,
            conv_channels=(16, 32, 48, 48, 32),
            fc_units=256,
            conv1_kernel=5,
            conv1_stride=max(1, input_size // 32),
            conv1_padding=2,
            conv2_kernel=5,
            init_std=0.0,  # 0 means: He initialisation (std = sqrt(2 / fan_in))
            init_bias=0.0,
        )
        params.update(overrides)
        return cls(**params)

    @classmethod
    def for_variant(
        cls, variant: str, num_classes: int | None = None, input_size: int | None = None, **overrides
    ) -> ModelConfig:
        """The config of a named variant (``VARIANTS``); ``None`` sizes take the variant's defaults
        (paper: 1000 classes at 227 px; small: 10 classes at 32 px)."""
        if variant not in VARIANTS:
            raise ValueError(f"model.variant={variant!r}: use one of {VARIANTS}")
        sizes = {k: v for k, v in (("num_classes", num_classes), ("input_size", input_size)) if v is not None}
        if variant == "small":
            return cls.small(**sizes, **overrides)
        return cls(**sizes, **overrides)

    @property
    def fc8_split(self) -> tuple[int, ...]:
        """Logits computed by each column: (column 0, column 1), column 0 taking the odd one; the
        one-column net's single column computes them all."""
        if self.columns == 1:
            return (self.num_classes,)
        half = (self.num_classes + 1) // 2
        return half, self.num_classes - half

    @property
    def pool_window(self) -> tuple[int, int]:
        """(window z, stride s) of every max-pool (``pooling``)."""
        return POOLINGS[self.pooling]

    def conv_widths(self) -> tuple[int, int, int, int, int]:
        """Kernels of conv1-conv5 in each of this net's columns: ``conv_channels`` for the paper's
        two columns; the one-column net keeps conv1-conv4's and takes the full conv5 (both columns')."""
        if self.columns == 2:
            return self.conv_channels
        c1, c2, c3, c4, c5 = self.conv_channels
        return c1, c2, c3, c4, 2 * c5

    def fc_width(self) -> int:
        """Units of fc6 and fc7 in each of this net's columns (the one-column net: both columns')."""
        return self.fc_units * (3 - self.columns)  # 2 columns: fc_units; 1 column: 2 * fc_units

    def spatial_sizes(self) -> tuple[int, int, int, int]:
        """Side of the maps after conv1, pool1, pool2 and pool5 (55, 27, 13, 6 for the paper, with
        either pooling; the small net at 32 px: 32, 15, 7, 3 overlapping, 32, 16, 8, 4 not)."""
        z, st = self.pool_window
        s1 = (self.input_size + 2 * self.conv1_padding - self.conv1_kernel) // self.conv1_stride + 1
        p1 = (s1 - z) // st + 1
        p2 = (p1 - z) // st + 1  # conv2 keeps the size (padding kernel // 2)
        p5 = (p2 - z) // st + 1  # conv3-5 keep the size (padding 1)
        return s1, p1, p2, p5


def crop_size(stored: int) -> int:
    """The crop side taken from ``stored`` px images when ``model.input_size`` is not set: the
    paper's fraction (227 of 256), rounded (36 -> 32, 64 -> 57, 72 -> 64, 256 -> 227)."""
    return max(1, round(stored * CROP_FRACTION))


def check_crop(input_size: int, stored: int) -> None:
    """Refuse a crop that sees less than half the stored side (its random crops would show a
    quarter of an object, or less): the fix is to leave ``model.input_size`` unset or to store the
    images nearer the crop's size."""
    if 2 * input_size < stored:
        fit = round(input_size / CROP_FRACTION)  # the stored side this crop is the paper's fraction of
        raise ValueError(
            f"model.input_size={input_size} crops less than half of the {stored} px stored images: "
            f"leave model.input_size unset (0: {crop_size(stored)} px, {CROP_FRACTION:.3f} of the side, "
            f"as the paper), or rebuild the shards with `alexnet shards --size {fit}`"
        )


def parse_model_sets(items: list[str] | None) -> dict[str, Any]:
    """``["model.activation=tanh", "model.remove_blocks=conv3"]`` -> ModelConfig overrides, each value
    coerced to its field's type: what ``alexnet info`` and ``alexnet verify`` take as ``--set``
    (the same ``model.*`` keys as ``alexnet train``'s [model] section)."""
    hints = typing.get_type_hints(ModelConfig)
    known = [f.name for f in dataclasses.fields(ModelConfig)]
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        section, _, name = key.strip().partition(".")
        if not sep or section != "model" or name not in known:
            raise ValueError(
                f"--set {item!r}: write --set model.KEY=VALUE with KEY one of {', '.join(known)} "
                "(e.g. --set model.activation=tanh)"
            )
        out[name] = _coerce(f"model.{name}", hints[name], value.strip())
    return out


def _coerce(key: str, hint: Any, text: str) -> Any:
    """A ``--set`` string as a ModelConfig field of type ``hint`` (str, int, float, bool, tuples)."""
    if typing.get_origin(hint) is tuple:
        item = typing.get_args(hint)[0]
        parts = [p.strip().strip("'\"") for p in text.strip("[]").split(",") if p.strip()]
        return tuple(_coerce(key, item, p) for p in parts)
    if hint is bool:
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"{key}={text!r}: use true or false")
        return text.lower() in ("true", "1", "yes")
    try:
        return hint(text)
    except ValueError:
        raise ValueError(f"{key}={text!r}: give {'an integer' if hint is int else 'a number'}") from None
