"""Package discovery for the project's two source folders: vtrain/ and tasks/, which installs as vtrain.tasks
(pyproject.toml holds everything else)."""
from setuptools import find_packages, setup

PACKAGES = [*find_packages(include=["vtrain", "vtrain.*"]),
            *(f"vtrain.tasks{'.' if name else ''}{name}" for name in ["", *find_packages("tasks")])]

if __name__ == "__main__":
    setup(packages=PACKAGES)
