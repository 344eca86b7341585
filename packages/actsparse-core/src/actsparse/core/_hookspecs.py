"""The hooks a plugin implements. These docstrings are the plugin API reference.

Implement any of them in a module or object, decorate each with
:data:`actsparse.core.hookimpl`, and point an entry point in the ``actsparse``
group at it::

    [project.entry-points.actsparse]
    my_masks = "my_package.actsparse_plugin"

The strategy and serializer hooks take no arguments and return records;
``actsparse_cli_commands`` receives a registrar and adds to it. Arguments may
be added to a hook, never renamed; an implementation may leave out any of them.
"""

from __future__ import annotations

from collections.abc import Sequence

import pluggy

from actsparse.core._protocols import CommandRegistrar
from actsparse.core._records import (
    AggregateStrategy,
    KernelStrategy,
    MaskStrategy,
    ReduceStrategy,
    Serializer,
)

PROJECT_NAME = "actsparse"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def actsparse_aggregate_strategies() -> Sequence[AggregateStrategy]:  # type: ignore[empty-body]
    """Return the aggregate strategies this plugin provides.

    Each strategy folds a layer's inputs into an accumulator during
    calibration. Names must be unique across all installed plugins. A
    strategy whose accumulator drops the sample dims declares
    ``feature_axis``; one that takes ``sparse_config`` keys declares them in
    ``params``; ``combine`` says how accumulators of several processes merge
    under ``torch.distributed`` (see :class:`AggregateStrategy`).

    Example::

        @hookimpl
        def actsparse_aggregate_strategies():
            return [
                AggregateStrategy(name="sum", fn=torch.add, elementwise=True, combine="sum")
            ]
    """


@hookspec
def actsparse_reduce_strategies() -> Sequence[ReduceStrategy]:  # type: ignore[empty-body]
    """Return the reduce strategies this plugin provides.

    Each strategy turns the aggregated data into the tensor that the mask
    function receives. Names must be unique across all installed plugins.

    Example::

        @hookimpl
        def actsparse_reduce_strategies():
            return [ReduceStrategy(name="mean", fn=lambda t: t.mean(dim=0))]
    """


@hookspec
def actsparse_mask_strategies() -> Sequence[MaskStrategy]:  # type: ignore[empty-body]
    """Return the mask strategies this plugin provides.

    Each strategy computes a {0, 1} mask from the reduced data and the layer's
    ``sparse_config``. Declare the accepted keys in ``params`` (and the
    mandatory ones in ``required``) so that a wrong or missing key is reported
    when the layer is registered, and give ``check(sparse_config) -> None``,
    which raises :class:`~actsparse.core.ConfigError` naming the key, so that
    a wrong value is too (``sparsity_level="0.5"``) rather than at ``step()``.
    Names must be unique across all installed plugins.

    Example::

        def check_margin(options):
            margin = options.get("margin", 0.0)
            if isinstance(margin, bool) or not isinstance(margin, (int, float)):
                raise ConfigError(f"margin must be a number, got {margin!r}")

        @hookimpl
        def actsparse_mask_strategies():
            return [
                MaskStrategy(
                    name="above",
                    fn=lambda t, margin=0.0: (t > margin).to(t.dtype),
                    params={"margin"},
                    check=check_margin,
                )
            ]
    """


@hookspec
def actsparse_serializers() -> Sequence[Serializer]:  # type: ignore[empty-body]
    """Return the serializers (state conversions and file formats) this plugin provides.

    ``dumps`` converts a sparsifier state dict to a stored form and ``loads``
    converts it back. Names must be unique across all installed plugins.

    Example::

        @hookimpl
        def actsparse_serializers():
            return [Serializer(name="identity", dumps=dict, loads=dict)]
    """


@hookspec
def actsparse_kernels() -> Sequence[KernelStrategy]:  # type: ignore[empty-body]
    """Return the kernels (ways of computing a squashed threshold-mode layer) this plugin provides.

    A kernel zeroes the entries ``|x| <= threshold`` of a layer's input and
    computes the layer, skipping what the zeros make useless. ``supports``
    says which modules it computes, ``available`` what the machine lacks, and
    ``crossover`` up to how many tokens it beats the dense layer, so that
    ``kernel="auto"`` can choose per call. ``tolerance`` declares a lossy
    kernel (one that changes weight values, such as a quantizing kernel) and
    how far its outputs may lie from the dense layer; ``auto`` never picks a
    lossy kernel. ``release`` gives a module's weights back when the kernel
    is detached (a kernel that stored them its own way writes them back as
    parameters). Names must be unique across all installed plugins.

    Example::

        @hookimpl
        def actsparse_kernels():
            return [
                KernelStrategy(
                    name="shrink_then_linear",
                    supports=lambda m: None if isinstance(m, nn.Linear) else "not a Linear",
                    apply=lambda m, t: lambda x: F.linear(F.hardshrink(x, t), m.weight, m.bias),
                )
            ]
    """


@hookspec
def actsparse_cli_commands(commands: CommandRegistrar) -> None:
    """Add subcommands to the ``actsparse`` command line (``pip install actsparse-cli``).

    Call ``commands.add(name, help=..., run=..., configure=...)`` once per
    subcommand (see :class:`~actsparse.core.CommandRegistrar`): ``configure``
    adds the command's arguments to its :mod:`argparse` parser, ``run`` gets
    the parsed arguments and returns the exit status. The built-in
    ``plugins``, ``inspect`` and ``demo`` commands are added through this
    hook too, by actsparse-cli's own entry point.

    Two plugins that add the same name are an error that names both. A
    third-party plugin that fails is reported in one line naming it, without
    a traceback: when this hook or a command's ``configure`` raises, its
    commands are left out and the others work; when ``run`` raises anything
    but an :class:`~actsparse.core.ActsparseError`, that command fails with
    exit status 1.

    The plugin needs nothing of actsparse-cli to implement this hook: without
    actsparse-cli installed it is simply never called.

    Example::

        def greet(args):
            print(f"hello, {args.name}")

        @hookimpl
        def actsparse_cli_commands(commands):
            commands.add(
                "greet",
                help="say hello",
                configure=lambda parser: parser.add_argument("name"),
                run=greet,
            )
    """
