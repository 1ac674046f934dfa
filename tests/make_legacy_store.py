"""Generates tests/fixtures/legacy_store_v1.tar.gz: a format-1 latent store written by the store code of commit
6f74b7a (before the commit record and checksums), for tests/test_store_integrity.py.

    git worktree add /tmp/old 6f74b7a
    PYTHONPATH=/tmp/old/src python tests/make_legacy_store.py

Contents (records from store_kill_helper.make_record, task 3): episode 0 complete (6 steps), episode 1 incomplete
(3 committed steps, no finish()).
"""

from __future__ import annotations

import pathlib
import sys
import tarfile
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from store_kill_helper import MANIFEST, TASK, make_record, write_episode

OUT = pathlib.Path(__file__).parent / "fixtures" / "legacy_store_v1.tar.gz"


def _normalize(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
    return info


def main() -> None:
    from openpi.latents.store import LatentStoreWriter, format

    assert format.FORMAT_VERSION == 1, "run this with the code of commit 6f74b7a on PYTHONPATH"
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp) / "legacy_store_v1"
        with LatentStoreWriter.create_or_open(root, MANIFEST, resume=False) as writer:
            write_episode(writer, 0)
            ep = writer.begin_episode(TASK, 1, {"init_state_index": 1, "seed": 7})
            for i in range(3):
                ep.append_step(make_record(1, i))
        with tarfile.open(OUT, "w:gz") as tar:
            tar.add(root, arcname=root.name, filter=_normalize)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
