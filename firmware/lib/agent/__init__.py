# The mpfleet device agent. Modules are small and flat, one concern each;
# big ones (crypto, OTA) are imported only when a job needs them.


def unload(*names):
    """Forget agent submodules so that the collector can take their memory: both
    sys.modules and this package (an import sets the submodule as its attribute)
    hold a reference. A later import loads the module again."""
    import sys

    package = sys.modules[__name__]
    for name in names:
        sys.modules.pop(__name__ + "." + name, None)
        try:
            delattr(package, name)
        except (AttributeError, KeyError):  # never imported (the port raises either)
            pass
