"""An example third-party gigagan plugin: a captioned checkerboard dataset."""

from gigagan_example_plugin.checkerboard import Checkerboard, CheckerboardSpec

__all__ = ["Checkerboard", "CheckerboardSpec"]
