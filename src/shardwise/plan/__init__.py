"""What each rank holds, as data: architecture specs, boxes, the rank mesh, rank plans, flat blocks and series
declarations. Everything downstream works from these plans; nothing here moves a byte of weights."""
