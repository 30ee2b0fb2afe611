"""Forge's built-in envs, registered by short name under the entry-point group `forge.envs`
(pyproject.toml). Named forge_envs, not envs, so no other package called envs can shadow them."""
