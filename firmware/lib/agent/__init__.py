# The mpfleet device agent. Modules are small and flat, one concern each;
# big ones (crypto, OTA) are imported only when a job needs them.
