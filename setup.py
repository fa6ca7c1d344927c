"""Builds the cffi extension (xxnode.kernel._clone3) and puts what `xxctl install` installs
into the wheel (xxnode/data/: the units and config templates from systemd/, the docs from
docs/, the eBPF object from ebpf/); metadata is in pyproject.toml."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).parent


class build_py_with_data(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install reads systemd/, docs/ and ebpf/ in place
        data = Path(self.build_lib) / "xxnode" / "data"
        shutil.rmtree(data, ignore_errors=True)
        shutil.copytree(HERE / "systemd", data / "systemd")
        (data / "docs").mkdir(parents=True)
        for doc in (HERE / "docs").glob("*.md"):
            shutil.copy2(doc, data / "docs" / doc.name)
        bpf = HERE / "ebpf" / "memwatch.bpf.o"
        if bpf.is_file():
            shutil.copy2(bpf, data / bpf.name)
        else:
            print("warning: no ebpf/memwatch.bpf.o (make -C ebpf): the wheel carries none")


setup(
    cffi_modules=["xxnode/kernel/_clone3_build.py:ffibuilder"],
    cmdclass={"build_py": build_py_with_data},
)
