"""Root conftest: names the suite's two pytest plugins and nothing else."""

pytest_plugins = ["fixtures.plugin", "reports.plugin"]
