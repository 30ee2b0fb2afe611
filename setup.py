"""What pyproject.toml cannot say: the repository's configs/ folder ships inside the package
as forge/configs (a mapping, so configs/ stays the one copy), where `forge train NAME` finds it."""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["forge", "forge.*", "forge_envs", "forge_envs.*"]), "forge.configs"],
    package_dir={"forge.configs": "configs"},
    package_data={"forge.configs": ["*.yaml"]},
)
