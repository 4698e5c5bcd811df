"""The compiled core is independent of libtorch, and the package layout is what users import."""
import importlib.util
import os
import struct

import fastalign


def elf_needed(path):
    """DT_NEEDED entries of an ELF64 little-endian shared object (no binutils needed)."""
    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b"\x7fELF" and data[4] == 2, "expected an ELF64 file"
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    dynamic = next(s for s in sections if s[1] == 6)  # SHT_DYNAMIC
    strtab = sections[dynamic[6]]  # sh_link -> .dynstr
    needed = []
    for off in range(dynamic[4], dynamic[4] + dynamic[5], 16):
        tag, val = struct.unpack_from("<qQ", data, off)
        if tag == 0:
            break
        if tag == 1:  # DT_NEEDED
            start = strtab[4] + val
            needed.append(data[start:data.index(b"\0", start)].decode())
    return needed


def test_extension_links_no_libtorch():
    needed = elf_needed(fastalign._backend.compiled().__file__)
    assert needed, "could not read NEEDED entries"
    assert not [n for n in needed if n.startswith(("libtorch", "libc10", "libcudart.so"))], needed


def test_cuda_sources_compiled_when_requested():
    if os.environ.get("FASTALIGN_CUDA") == "1":
        assert fastalign._backend.compiled().cuda_compiled


def test_triton_kernels_ship_inside_the_package():
    spec = importlib.util.find_spec("fastalign.kernels.token_stats")
    assert spec is not None and spec.origin.endswith("token_stats.py")
