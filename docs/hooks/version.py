"""MkDocs hook: the site's header and footer name the version of autobatch they document."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[2]


def on_config(config):
    # Read, not imported: building the site needs no torch.
    version = re.search(r'__version__ = "([^"]+)"', (ROOT / "autobatch" / "__init__.py").read_text()).group(1)
    config.site_name = f"autobatch {version}"
    config.copyright = (f'autobatch {version}, BSD-3-Clause. <a href="{config.site_url}changelog/">Changelog</a> · '
                        f'<a href="{config.repo_url}/releases">releases</a>')
    return config
