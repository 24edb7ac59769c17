"""xarray/dask/zarr stages: the synthetic benchmark, increments, statistics, stores."""
