"""PEP 517 backend: setuptools, building against the torch of the environment that runs `pip install`.

Under build isolation pip hides the installing environment's site-packages, so a plain `pip install .`
would either fail to import torch or (were torch listed in build requirements) download a multi-GB torch
that may not match the one the extension will be loaded into. This backend puts the installing
environment's site-packages back at the *end* of sys.path: the isolated setuptools still wins, and torch
comes from where it will be imported at run time. Nothing is downloaded; without torch, setup.py's
message says what to install.
"""
import sys
import sysconfig

from setuptools import build_meta as _setuptools

for _key in ("purelib", "platlib"):
    _path = sysconfig.get_paths()[_key]
    if _path not in sys.path:
        sys.path.append(_path)

get_requires_for_build_wheel = _setuptools.get_requires_for_build_wheel
get_requires_for_build_sdist = _setuptools.get_requires_for_build_sdist
get_requires_for_build_editable = _setuptools.get_requires_for_build_editable
prepare_metadata_for_build_wheel = _setuptools.prepare_metadata_for_build_wheel
prepare_metadata_for_build_editable = _setuptools.prepare_metadata_for_build_editable
build_wheel = _setuptools.build_wheel
build_sdist = _setuptools.build_sdist
build_editable = _setuptools.build_editable
