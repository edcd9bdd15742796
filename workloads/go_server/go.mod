module idlebuf/workloads/go_server

go 1.19
