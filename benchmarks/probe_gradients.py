"""Where a stage's gradient norm comes from: `rwkvinside distill` as given, printing for every
optimizer step the trained parameters with the largest gradient norms (before clipping) and the
tokens whose gradient arriving at the first converted layer's output is largest.

    python benchmarks/probe_gradients.py distill --stage 2 --init-from RUN/stage1/student \\
        --output /tmp/probe --overwrite "convert.layers=[...]" stage2.max_steps=6
    python benchmarks/probe_gradients.py --top 3 distill ...      # three of each a step

Everything after the probe's own options is `rwkvinside`'s command line; the steps run eagerly
(train.compile and train.cuda_graph are turned off: a hook cannot see into a replayed graph).
BENCHMARKS.md ("Where the hybrid's stage-2 gradient spikes come from") quotes it. It wraps two of
the project's methods for the run; nothing it prints changes the training.
"""

from __future__ import annotations

import argparse
import sys

from torch import Tensor, nn

from rwkvinside import cli
from rwkvinside.distill.engine import PlainEngine
from rwkvinside.distill.loop import Trainer


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--top", type=int, default=6, help="parameters and tokens printed a step (default 6)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="rwkvinside's command line (distill ...)")
    args = p.parse_args(argv)
    if not args.command or args.command[0] != "distill":
        p.error("give a distill command line after the probe's options")
    return args, [*args.command, "train.compile=false", "train.cuda_graph=false"]


def parameter_norms(engine: PlainEngine, top: int) -> str:
    """The step's total gradient norm and its largest contributors (the master weights' gradients,
    as finish_step clips them)."""
    names = dict(zip(map(id, engine.masters), engine.trainable))
    norms = sorted(((float(m.grad.norm()), names[id(m)]) for m in engine.masters if m.grad is not None),
                   reverse=True)
    total = sum(norm * norm for norm, _ in norms) ** 0.5
    return f"total {total:.4g}; largest: " + ", ".join(f"{name} {norm:.4g}" for norm, name in norms[:top])


def token_norms(grad: Tensor, top: int) -> str:
    """The largest per-token gradient norms of an output [B, T, C], with their (row, position)."""
    per_token = grad.float().norm(dim=-1)
    largest = per_token.flatten().topk(min(top, per_token.numel()))
    places = [divmod(int(i), per_token.shape[1]) for i in largest.indices]
    listed = ", ".join(f"({row}, {pos}) {float(v):.4g}" for (row, pos), v in zip(places, largest.values))
    return f"median {float(per_token.median()):.4g}; largest (row, position): {listed}"


def install(top: int) -> None:
    """Print from inside the run: the tokens as each backward reaches the first converted layer,
    the parameters as each step's gradients reach the master weights."""
    step = [0]
    gradients_to_masters = PlainEngine._gradients_to_masters
    trainer_init = Trainer.__init__

    def reporting_gradients_to_masters(self: PlainEngine) -> None:
        gradients_to_masters(self)
        step[0] += 1
        print(f"step {step[0]} parameters: {parameter_norms(self, top)}", flush=True)

    def hooked_init(self: Trainer, *args, **kwargs) -> None:
        trainer_init(self, *args, **kwargs)
        first = self.model.rwkv_layers[0]
        attention = self.model.model.layers[first].self_attn

        def on_output(module: nn.Module, inputs, output) -> None:
            hidden = output[0] if isinstance(output, tuple) else output
            if hidden.requires_grad:
                hidden.register_hook(lambda grad: print(
                    f"step {step[0] + 1} tokens at layer {first}'s output: {token_norms(grad, top)}", flush=True))

        attention.register_forward_hook(on_output)

    PlainEngine._gradients_to_masters = reporting_gradients_to_masters
    Trainer.__init__ = hooked_init


def main(argv: list[str] | None = None) -> int:
    args, command = parse_args(sys.argv[1:] if argv is None else argv)
    install(args.top)
    return cli.main(command)


if __name__ == "__main__":
    sys.exit(main())
