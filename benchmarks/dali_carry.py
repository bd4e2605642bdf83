"""Carry NVIDIA DALI to a device machine that has no internet, in pieces small enough for one call each.

    python benchmarks/dali_carry.py pack  [--carry .carry] [--piece-mib 60]      # here, once
    python benchmarks/dali_carry.py install --pieces DIR[,DIR...] --target DIR  # there (gpu_suite's dali_install)

pack: downloads the wheels DALI needs for Python 3.12 on manylinux x86_64 (pip download, into
.carry/dali_wheels/, kept: a second pack downloads nothing), puts them in one tar, writes its SHA-256 and size to
.carry/dali/SHA256SUMS, and splits it into .carry/dali/part.00, part.01, ... of at most --piece-mib MiB (a device
call carries 64 MiB in all). It also copies the loader benchmark's images to .carry/data/ilsvrc-val-300.tar.
.carry/ is git-ignored; benchmarks/README.md gives the calls that carry the pieces.
install: joins the pieces found in the given folders (the first folder holding a piece wins for its name),
checks the joined tar's size and SHA-256 against SHA256SUMS, unpacks it and installs the wheels with
pip --target (no index, no dependencies). Put --target on PYTHONPATH to use it. --verify-only stops after
the check (the suite's dry run does that with the pieces packed here).
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TAR_NAME = "dali_wheels.tar"
SUMS = "SHA256SUMS"
# The wheels DALI 2.4 for CUDA 13 imports and dlopens to decode JPEG on the GPU, and its pure-Python needs that
# the device image lacks (six, packaging and numpy are there). nvidia-libnvcomp-cu13 is left out: DALI loads it
# only for compressed-data operators, which the loader does not use.
WHEELS = ("nvidia-dali-cuda130==2.4.0", "nvidia-nvimgcodec-cu13>=0.9.0,<0.10.0", "nvidia-nvjpeg==13.0.*",
          "astunparse==1.6.3", "gast==0.6.0", "optree", "nvtx", "makefun", "libcst~=1.8")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download(wheels_dir: str) -> list:
    os.makedirs(wheels_dir, exist_ok=True)
    for spec in WHEELS:
        name = spec.split("=")[0].split("<")[0].split(">")[0].split("~")[0].replace("-", "_").lower()
        have = [w for w in glob.glob(os.path.join(wheels_dir, "*.whl"))
                if os.path.basename(w).lower().startswith(name + "-")]
        if have:
            print(f"have {os.path.basename(have[0])}", flush=True)
            continue
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
               "3.12", "--implementation", "cp", *[x for p in PLATFORMS for x in ("--platform", p)], "-d",
               wheels_dir, spec]
        print("$ " + " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    return sorted(glob.glob(os.path.join(wheels_dir, "*.whl")))


def pack(wheels: list, out_dir: str, piece_bytes: int) -> dict:
    """One tar of `wheels`, its SHA256SUMS, and pieces part.NN of at most piece_bytes in out_dir (emptied first)."""
    os.makedirs(out_dir, exist_ok=True)
    for old in glob.glob(os.path.join(out_dir, "part.*")) + glob.glob(os.path.join(out_dir, SUMS)):
        os.remove(old)
    with tempfile.TemporaryDirectory() as tmp:
        tar_path = os.path.join(tmp, TAR_NAME)
        with tarfile.open(tar_path, "w") as tar:
            for w in wheels:
                tar.add(w, arcname=os.path.basename(w))
        digest, size = sha256_of(tar_path), os.path.getsize(tar_path)
        pieces = []
        with open(tar_path, "rb") as f:
            for i in range(0, size, piece_bytes):
                piece = os.path.join(out_dir, f"part.{len(pieces):02d}")
                with open(piece, "wb") as p:
                    p.write(f.read(piece_bytes))
                pieces.append(piece)
    with open(os.path.join(out_dir, SUMS), "w") as f:
        f.write(f"{digest}  {TAR_NAME}  {size}  {len(pieces)}\n")
    return {"sha256": digest, "bytes": size, "pieces": pieces, "wheels": [os.path.basename(w) for w in wheels]}


def read_sums(dirs: list) -> dict:
    for d in dirs:
        path = os.path.join(d, SUMS)
        if os.path.exists(path):
            digest, name, size, count = open(path).read().split()
            return {"sha256": digest, "name": name, "bytes": int(size), "pieces": int(count)}
    raise SystemExit(f"dali_carry: no {SUMS} in {', '.join(dirs)} (carry .carry/dali/{SUMS} with the last piece)")


def join(dirs: list, dest: str) -> dict:
    """Joins the pieces of `dirs` into dest and checks it against SHA256SUMS; SystemExit naming what is wrong."""
    sums = read_sums(dirs)
    found = {}
    for d in dirs:
        for piece in sorted(glob.glob(os.path.join(d, "part.*"))):
            found.setdefault(os.path.basename(piece), piece)
    want = [f"part.{i:02d}" for i in range(sums["pieces"])]
    missing = [w for w in want if w not in found]
    if missing:
        raise SystemExit(f"dali_carry: missing piece(s) {', '.join(missing)} of {sums['pieces']} in "
                         f"{', '.join(dirs)}")
    with open(dest, "wb") as out:
        for w in want:
            with open(found[w], "rb") as f:
                shutil.copyfileobj(f, out)
    size = os.path.getsize(dest)
    if size != sums["bytes"]:
        raise SystemExit(f"dali_carry: joined {size} bytes, {SUMS} says {sums['bytes']} (a truncated piece?)")
    digest = sha256_of(dest)
    if digest != sums["sha256"]:
        raise SystemExit(f"dali_carry: SHA-256 of the joined tar is {digest}, {SUMS} says {sums['sha256']}")
    return {"sha256": digest, "bytes": size, "pieces": [found[w] for w in want]}


def install(dirs: list, target: str, verify_only: bool = False) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        joined = join(dirs, os.path.join(tmp, TAR_NAME))
        if verify_only:
            with tarfile.open(os.path.join(tmp, TAR_NAME)) as tar:
                joined["wheels"] = sorted(m.name for m in tar.getmembers())
            return joined
        unpacked = os.path.join(tmp, "wheels")
        os.makedirs(unpacked)
        with tarfile.open(os.path.join(tmp, TAR_NAME)) as tar:
            for member in tar.getmembers():  # flat wheel files only
                if not member.isfile() or os.path.basename(member.name) != member.name:
                    raise SystemExit(f"dali_carry: unexpected member {member.name!r} in the carried tar")
                with tar.extractfile(member) as src, open(os.path.join(unpacked, member.name), "wb") as dst:
                    shutil.copyfileobj(src, dst)
        wheels = sorted(glob.glob(os.path.join(unpacked, "*.whl")))
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--no-cache-dir", "--upgrade", "--target", target, *wheels]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"dali_carry: pip install failed: {(done.stdout + done.stderr)[-2000:]}")
    joined["wheels"] = [os.path.basename(w) for w in wheels]
    joined["target"] = target
    return joined


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pk = sub.add_parser("pack", help="download, tar, checksum and split the wheels (and copy the loader data)")
    pk.add_argument("--carry", default=os.path.join(ROOT, ".carry"), help="the carried folder (default .carry)")
    pk.add_argument("--piece-mib", type=int, default=60, help="largest piece in MiB (default 60)")
    pk.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "data", "ilsvrc-val-300.tar"),
                    help="images for the loader benchmark (default ../shared/data/ilsvrc-val-300.tar)")
    ins = sub.add_parser("install", help="join, verify and pip-install the carried wheels")
    ins.add_argument("--pieces", required=True, help="comma list of folders holding part.* and SHA256SUMS")
    ins.add_argument("--target", required=True, help="pip --target folder (put it on PYTHONPATH)")
    ins.add_argument("--json", default=None, help="also write what was installed as JSON here")
    ins.add_argument("--verify-only", action="store_true", help="join and check the pieces, install nothing")
    args = p.parse_args(argv)
    if args.cmd == "pack":
        wheels = download(os.path.join(args.carry, "dali_wheels"))
        result = pack(wheels, os.path.join(args.carry, "dali"), args.piece_mib << 20)
        os.makedirs(os.path.join(args.carry, "data"), exist_ok=True)
        shutil.copy(args.data, os.path.join(args.carry, "data", "ilsvrc-val-300.tar"))
        for piece in result["pieces"]:
            print(f"{os.path.relpath(piece, ROOT)}  {os.path.getsize(piece) / 2 ** 20:.1f} MiB")
        print(f"{len(result['wheels'])} wheels, {result['bytes'] / 2 ** 20:.1f} MiB, sha256 {result['sha256']}")
        return 0
    dirs = [d for d in args.pieces.split(",") if d]
    result = install(dirs, args.target, verify_only=args.verify_only)
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
