"""What the bundled wheels require: for bundle.sh's check here (against the GPU machine's package list) and
run.sh's check there (against what is installed, versions included)."""
import zipfile
from email.parser import Parser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename


def bundled(folder) -> dict:
    """{canonical name: (version, wheel path)} of the wheels in `folder` (none when it does not exist)."""
    folder = Path(folder)
    return {canonicalize_name(parse_wheel_filename(w.name)[0]): (str(parse_wheel_filename(w.name)[1]), w)
            for w in sorted(folder.glob("*.whl"))} if folder.is_dir() else {}


def requirements(wheel: Path, env: dict) -> list[Requirement]:
    """The wheel's Requires-Dist whose markers hold in `env` (extras left out)."""
    z = zipfile.ZipFile(wheel)
    meta = Parser().parsestr(z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode())
    reqs = [Requirement(line) for line in meta.get_all("Requires-Dist") or []]
    return [r for r in reqs if not r.marker or r.marker.evaluate({"extra": "", **env})]
