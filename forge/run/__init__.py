"""The training run loop: one shared run context (`context`) under one module per mode
(`sync`, `async_`, `gateway`); `launch.train` checks the config and picks the mode."""
