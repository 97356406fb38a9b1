"""Packaging for metahub.

``twisted.plugins`` is listed as a package (it is a namespace: no ``__init__.py``) so that
``twisted/plugins/metahub_plugin.py`` is installed where ``twistd`` looks for plugins, for both
``pip install .`` and ``pip install -e .``.
"""
from setuptools import find_packages, setup

setup(
    name="metahub",
    version="0.1.0",
    description="Pull-through caching proxy for container registries with per-machine-type images",
    python_requires=">=3.11",
    package_dir={"": "."},
    packages=["storage", "twisted.plugins", *find_packages(include=["metahub", "metahub.*"])],
    package_data={"twisted.plugins": ["metahub_plugin.py"], "metahub.config": ["example.yaml"]},
    install_requires=[
        "twisted[tls]>=24.3",
        "treq>=23.11",
        "lmdb>=1.4",
        "pyyaml>=6.0",
        # The config file's schema: validation, error locations and `metahub config-schema`.
        "pydantic>=2.7,<3",
        "service-identity>=24.1",
        # Imported directly: the CA bundle parser (config.py) and the upstream certificate check,
        # which needs Connection.set_verify (22.1) and X509VerificationCodes (23.2).
        "cryptography>=39",
        "pyOpenSSL>=23.2",
        "prometheus-client>=0.20",
        # The cpu: feature family: microarchitecture names and their ancestry (Spack's archspec).
        "archspec>=0.2.1",
    ],
    # wheel: the install test builds metahub without build isolation, as an offline user would.
    # mypy within one minor release: a new one may find new errors, and scripts/test fails on any;
    # mypy-zope teaches it zope.interface (Twisted's interfaces), types-PyYAML types yaml.
    extras_require={"test": [
        "pytest>=8", "hypothesis>=6.100", "wheel", "bcrypt", "cryptography",
        "mypy>=2.4,<2.5", "mypy-zope>=1.0.17", "types-PyYAML>=6.0.12",
    ]},
    entry_points={"console_scripts": ["metahub = metahub.app.cli:main"]},
)
