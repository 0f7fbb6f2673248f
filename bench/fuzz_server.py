"""Coverage-guided fuzzing of the frame decoder, the router and body decoding, with atheris.

Run on demand, not in CI (a million inputs took 8 minutes on a 2-core x86-64, one process)::

    python bench/fuzz_server.py -atheris_runs=1000000
    python bench/fuzz_server.py --keep-going --findings fuzz-findings -atheris_runs=1000000

The targets and their properties are in ``bench/fuzz_targets.py``. The seed corpus (valid frames
and bodies built with ``protocol.encode_frame`` and ``package.pack``) is written to ``--corpus``
(a temporary folder by default), where libFuzzer also keeps the inputs that found new coverage.
Arguments with a single leading dash are libFuzzer's (``-atheris_runs=N``,
``-max_total_time=S``, ``-max_len=N``, ...); other folders given are corpus folders too.

By default the first finding stops the run with its traceback, and libFuzzer saves the input as
``crash-<sha1>``. With ``--keep-going`` each distinct finding (by signature) is printed once,
its first inputs are saved under ``--findings``, and the run goes on. Replay saved inputs, with
or without atheris installed::

    python bench/fuzz_server.py --replay fuzz-findings/*.bin
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
for folder in (ROOT, BENCH):  # the project's modules and fuzz_targets.py beside this file
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

# Instrumented for coverage: the project's own code and the targets. Third-party modules are
# C extensions (msgspec, zstandard) whose branches libFuzzer cannot see anyway.
INSTRUMENTED = ["protocol", "package", "pyasync", "actions", "context", "fuzz_targets"]
PROGRESS_EVERY = 100_000  # inputs between progress lines
SAVED_PER_FINDING = 5  # inputs kept per distinct finding with --keep-going


def _parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="bench/fuzz_server.py",
        description="Fuzz the frame decoder, the router and body decoding (atheris).",
        epilog="Other arguments go to libFuzzer, e.g. -atheris_runs=1000000.",
    )
    parser.add_argument("--corpus", type=Path, help="seed and corpus folder (default: temporary)")
    parser.add_argument(
        "--keep-going", action="store_true", help="record each distinct finding and go on"
    )
    parser.add_argument(
        "--findings", type=Path, default=Path("fuzz-findings"),
        help="where --keep-going saves inputs (default: ./fuzz-findings)",
    )  # fmt: skip
    parser.add_argument("--replay", nargs="+", type=Path, metavar="FILE", help="run inputs once")
    return parser.parse_known_args(argv)


class Recorder:
    """Counts inputs, prints progress, and with ``keep_going`` records findings instead of
    stopping at the first."""

    def __init__(
        self,
        one_input: Callable[[bytes], None],
        *,
        keep_going: bool,
        findings: Path,
        runs: int | None = None,
    ) -> None:
        self.one_input = one_input
        self.keep_going = keep_going
        self.findings = findings
        self.runs = runs  # -atheris_runs: the summary is printed after the last
        self.count = 0
        self.by_signature: Counter[str] = Counter()
        self.started = time.monotonic()

    def __call__(self, data: bytes) -> None:
        import fuzz_targets  # loaded (and instrumented) by now

        self.count += 1
        if self.count % PROGRESS_EVERY == 0:
            self.progress()
        try:
            self.one_input(data)
        except fuzz_targets.Finding as finding:
            if not self.keep_going:
                raise
            self.record(finding, data)
        if self.count == self.runs:
            self.summary()

    def record(self, finding: AssertionError, data: bytes) -> None:
        import fuzz_targets

        signature = getattr(finding, "signature", type(finding).__name__)
        self.by_signature[signature] += 1
        seen = self.by_signature[signature]
        if seen > SAVED_PER_FINDING:
            return
        self.findings.mkdir(parents=True, exist_ok=True)
        slug = "".join(c if c.isalnum() else "-" for c in signature).strip("-")
        path = self.findings / f"{slug}-{fuzz_targets.seed_name(data)}.bin"
        path.write_bytes(data)
        if seen == 1:
            print(f"[fuzz] new finding {signature}: {path}\n{finding}", file=sys.stderr)
            with (self.findings / "summary.txt").open("a") as summary:
                summary.write(f"{signature}\t{path.name}\n{finding}\n\n")

    def summary(self) -> None:
        """The figures of the whole run and each distinct finding with its input count."""
        if self.count % PROGRESS_EVERY:  # else progress() has just printed them
            self.progress()
        for signature, count in self.by_signature.most_common():
            print(f"[fuzz]   {count:8d} x {signature}", file=sys.stderr)
        if self.by_signature:
            print(f"[fuzz] inputs saved in {self.findings}", file=sys.stderr, flush=True)

    def progress(self) -> None:
        elapsed = time.monotonic() - self.started
        print(
            f"[fuzz] {self.count} inputs in {elapsed:.0f} s ({self.count / elapsed:.0f}/s), "
            f"{len(self.by_signature)} distinct findings "
            f"({sum(self.by_signature.values())} inputs)",
            file=sys.stderr,
            flush=True,
        )


def replay(paths: Sequence[Path]) -> int:
    """Run saved inputs once each; print each finding's detail. Returns the exit status."""
    import fuzz_targets

    failed = 0
    for path in paths:
        try:
            fuzz_targets.one_input(path.read_bytes())
        except fuzz_targets.Finding as finding:
            failed += 1
            print(f"{path}: FINDING {finding.signature}\n{finding.detail}\n")
        else:
            print(f"{path}: ok")
    fuzz_targets.close()
    return 1 if failed else 0


def write_seeds(corpus: Path) -> int:
    """Write the seed inputs into ``corpus``; returns how many."""
    import fuzz_targets

    corpus.mkdir(parents=True, exist_ok=True)
    count = 0
    for data in fuzz_targets.seeds():
        (corpus / fuzz_targets.seed_name(data)).write_bytes(data)
        count += 1
    return count


def main(argv: Sequence[str] | None = None) -> None:
    """Fuzz with atheris until libFuzzer's limits (or the first finding) stop it."""
    args, fuzzer_args = _parse_args(sys.argv[1:] if argv is None else argv)
    # The targets check the log records themselves; nothing is printed for them.
    logging.getLogger().addHandler(logging.NullHandler())
    if args.replay:
        sys.exit(replay(args.replay))
    try:
        import atheris
        from atheris.import_hook import instrument_imports
    except ImportError:
        sys.exit("atheris is not installed: pip install -r requirements-dev.txt (Linux, x86-64)")
    with instrument_imports(include=INSTRUMENTED):
        import fuzz_targets
    corpus_dirs = [arg for arg in fuzzer_args if not arg.startswith("-")]
    corpus = args.corpus or (
        Path(corpus_dirs[0]) if corpus_dirs else Path(tempfile.mkdtemp(prefix="pyasync-fuzz-"))
    )
    seeded = write_seeds(corpus)
    print(f"[fuzz] {seeded} seeds in {corpus}", file=sys.stderr)
    if str(corpus) not in corpus_dirs:
        fuzzer_args.insert(0, str(corpus))  # the first folder receives new inputs
    runs = [int(arg.split("=", 1)[1]) for arg in fuzzer_args if arg.startswith("-atheris_runs=")]
    recorder = Recorder(
        fuzz_targets.one_input,
        keep_going=args.keep_going,
        findings=args.findings,
        runs=runs[-1] if runs else None,
    )
    atheris.Setup([sys.argv[0], *fuzzer_args], recorder)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
