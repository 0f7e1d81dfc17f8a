"""Finding models: registered names and plugins, local folders, hub ids and object-store URIs, the download cache,
and the device and dtype names users write."""
