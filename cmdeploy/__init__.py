"""cmdeploy: class-agnostic CT segmentation from four extreme points."""

__version__ = "0.1.0"
