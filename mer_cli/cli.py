"""The ``mer`` command group.

Subcommands live in ``mer_cli/commands/<name>.py`` (each exposes ``command``) and
are imported only when run, so ``mer --help`` starts without numpy or numba.
"""

from __future__ import annotations

import importlib
import os
import sys

import click

from mer_cli import __version__
from mer_cli.errors import MerError

# command name -> (module, one-line summary shown by ``mer --help``)
COMMANDS: dict[str, tuple[str, str]] = {
    "inspect": ("inspect", "Show what a store holds: model, sizes, files, layout."),
    "verify": ("verify", "Check every checksum, alignment and bound of a store."),
    "profile-ssd": (
        "profile_ssd",
        "Measure how a drive reads; save the reader settings it needs.",
    ),
    "quantize": (
        "quantize",
        "Convert a Hugging Face checkpoint directory or a GGUF file into a store.",
    ),
    "generate": ("generate", "Generate text from a prompt, streamed as tokens come."),
    "trace": ("trace", "Record the router's choices for every token and layer."),
    "train-predictor": (
        "train_predictor",
        "Fit expert predictors on traces; report held-out recall and hit rates.",
    ),
    "shard": ("shard", "Spread a store's experts over several drives or files."),
    "synth": (
        "synth",
        "Write a synthetic Hugging Face checkpoint of a preset's shapes.",
    ),
}


class LazyGroup(click.Group):
    """A group that imports a subcommand's module only when it is used."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module = importlib.import_module(f"mer_cli.commands.{COMMANDS[name][0]}")
        return module.command

    def format_commands(
        self, ctx: click.Context, formatter: click.HelpFormatter
    ) -> None:
        # summaries come from the table so listing commands imports nothing
        rows = [(name, COMMANDS[name][1]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except MerError as e:
            click.echo(f"Error: {e}", err=True)
            ctx.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            ctx.exit(130)
        except BrokenPipeError:
            # the reader went away (e.g. `| head`): stop quietly
            _silence_stdout()
            ctx.exit(0)


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except OSError:
        pass


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="mer")
def cli() -> None:
    """Run Mixture-of-Experts language models on CPU with experts streamed from NVMe.

    \b
    Typical use:
      mer quantize ./Mixtral-8x7B-v0.1 -o mixtral.mer
      mer generate --model mixtral.mer --prompt "The capital of France is"
      mer generate --prompt "def fibonacci(n):"     # built-in small model
    """


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    # library warnings (lossy conversions, buffered-I/O fallback) read as one line
    click.echo(f"Warning: {message}", err=True)


def main() -> None:
    import warnings

    from mer_cli.kernels.config import single_blas_thread

    warnings.showwarning = _show_warning
    single_blas_thread()
    cli(prog_name="mer")
