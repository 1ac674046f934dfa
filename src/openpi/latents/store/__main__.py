"""Command line of the latent store.

    python -m openpi.latents.store verify <store> [--decode] [--quiet]

``verify`` checks every committed row of every episode (see ``openpi.latents.store.verify``) and lists what is
damaged, one line per damaged file, with the fix. Exit status: 0 intact, 1 damaged, 2 not a latent store.
"""

from __future__ import annotations

import argparse
import sys

import tqdm

from openpi.latents.store.format import StoreFormatError
from openpi.latents.store.location import ObjectStoreError
from openpi.latents.store.verify import verify_store


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m openpi.latents.store", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    v = sub.add_parser(
        "verify",
        help="check every committed row of a store and list what is damaged",
        description="Check every committed row of a latent store: commit records intact, array metadata matching "
        "them, chunk files present and matching the checksums of the commit record (format 3: crc32 bound to each "
        "file's place; format 2: crc32c of the file); format-1 stores are decoded row by row. Exit 0 intact, "
        "1 damaged, 2 not a store.",
    )
    v.add_argument("store", help="the store: a directory, s3://bucket/prefix or gs://bucket/prefix (--output-dir)")
    v.add_argument("--decode", action="store_true", help="also decode every row of format-2 stores (slower)")
    v.add_argument("--quiet", action="store_true", help="no progress bar")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    bar = None if args.quiet else tqdm.tqdm(desc="episodes", unit="ep", dynamic_ncols=True, file=sys.stderr)

    def progress(done: int, total: int) -> None:
        if bar is not None:
            bar.total = total
            bar.update(done - bar.n)

    try:
        report = verify_store(args.store, decode=args.decode, progress=progress)
    except (StoreFormatError, FileNotFoundError, ObjectStoreError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if bar is not None:
            bar.close()
    for damage in report.damages:
        print("DAMAGED " + damage.describe())
    if report.legacy_unbound:
        print(
            f"note: {report.legacy_unbound} episodes were written in an earlier format (commit format 1 or 2): "
            "their files were checked for presence, truncation and flipped bits, but they carry no checksums that "
            "bind a chunk to its row and episode, nor a checksum of commit.json itself (not damage)."
        )
    print(
        f"{report.root}: {report.episodes} episodes ({report.complete} complete, {len(report.incomplete)} incomplete), "
        f"{report.rows} committed rows checked; "
        + ("intact." if report.ok else f"{len(report.damaged_episodes())} episodes/tasks damaged.")
    )
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
