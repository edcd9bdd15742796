// Queued model, goroutines: a Go echo server with a goroutine per connection blocked in
// conn.Read(buf) on its own buffer - the way most Go servers are written.
//
// The kernel holds no read for an idle connection: Go's runtime makes the socket
// non-blocking, and a Read that finds no data parks the goroutine on the netpoller (epoll)
// with its buffer in hand. idlebuf sees these as parked reads.
//
// Speaks the load generator's echo protocol: whatever a connection sends is sent back.
// Prints {"event": "listening", ...} when ready and its ground truth as JSON on SIGUSR1 and
// at exit (SIGTERM/SIGINT): connections, the goroutines inside Read with their buffers (fd,
// address, length), reads completed, bytes received, RSS.
package main

import (
	"encoding/json"
	"flag"
	"net"
	"os"
	"os/signal"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"unsafe"
)

type buffer struct {
	Fd   int     `json:"fd"`
	Addr uintptr `json:"addr"`
	Len  int     `json:"len"`
}

type server struct {
	mu            sync.Mutex
	bufferSize    int
	accepted      int
	open          map[int]bool
	reading       map[int]buffer // goroutines inside conn.Read, by fd
	readsComplete int
	bytesReceived int
}

func (s *server) serve(conn net.Conn) {
	fd := connFd(conn)
	buf := make([]byte, s.bufferSize) // this connection's own buffer
	b := buffer{Fd: fd, Addr: uintptr(unsafe.Pointer(&buf[0])), Len: len(buf)}
	defer func() {
		s.mu.Lock()
		delete(s.open, fd)
		delete(s.reading, fd)
		s.mu.Unlock()
		conn.Close()
	}()
	for {
		s.mu.Lock()
		s.reading[fd] = b
		s.mu.Unlock()
		n, err := conn.Read(buf)
		s.mu.Lock()
		delete(s.reading, fd)
		if n > 0 {
			s.readsComplete++
			s.bytesReceived += n
		}
		s.mu.Unlock()
		if err != nil {
			return
		}
		if _, err := conn.Write(buf[:n]); err != nil {
			return
		}
	}
}

func connFd(conn net.Conn) int {
	fd := -1
	if raw, err := conn.(*net.TCPConn).SyscallConn(); err == nil {
		raw.Control(func(f uintptr) { fd = int(f) })
	}
	return fd
}

func residentBytes() int {
	data, err := os.ReadFile("/proc/self/statm")
	if err != nil {
		return 0
	}
	fields := strings.Fields(string(data))
	pages, _ := strconv.Atoi(fields[1])
	return pages * os.Getpagesize()
}

func (s *server) groundTruth() map[string]interface{} {
	s.mu.Lock()
	defer s.mu.Unlock()
	buffers := make([]buffer, 0, len(s.reading))
	for _, b := range s.reading {
		buffers = append(buffers, b)
	}
	sort.Slice(buffers, func(i, j int) bool { return buffers[i].Fd < buffers[j].Fd })
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return map[string]interface{}{
		"event":                "ground_truth",
		"model":                "queued-goroutines",
		"pid":                  os.Getpid(),
		"connections_accepted": s.accepted,
		"connections_open":     len(s.open),
		"buffer_size":          s.bufferSize,
		"buffers":              buffers,
		"posted_reads":         len(buffers), // goroutines in Read hold their buffers
		"pinned_bytes":         len(buffers) * s.bufferSize,
		"reads_completed":      s.readsComplete,
		"bytes_received":       s.bytesReceived,
		"rss_bytes":            residentBytes(),
		"stack_inuse":          ms.StackInuse, // the runtime's own count of goroutine stacks
		"heap_inuse":           ms.HeapInuse,
		"goroutines":           runtime.NumGoroutine(),
	}
}

func emit(record map[string]interface{}) {
	line, _ := json.Marshal(record)
	os.Stdout.Write(append(line, '\n'))
}

func main() {
	host := flag.String("host", "127.0.0.1", "address to listen on")
	port := flag.Int("port", 0, "0: any free port (printed)")
	bufferSize := flag.Int("buffer-size", 16384, "read buffer per connection")
	flag.Parse()

	var lim syscall.Rlimit
	if syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim) == nil {
		lim.Cur = lim.Max
		syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim)
	}
	listener, err := net.Listen("tcp", net.JoinHostPort(*host, strconv.Itoa(*port)))
	if err != nil {
		os.Stderr.WriteString("go_server: " + err.Error() + "\n")
		os.Exit(1)
	}
	s := &server{bufferSize: *bufferSize, open: map[int]bool{}, reading: map[int]buffer{}}
	signals := make(chan os.Signal, 4)
	signal.Notify(signals, syscall.SIGUSR1, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		for sig := range signals {
			emit(s.groundTruth())
			if sig != syscall.SIGUSR1 {
				os.Exit(0)
			}
		}
	}()
	addr := listener.Addr().(*net.TCPAddr)
	emit(map[string]interface{}{
		"event": "listening", "pid": os.Getpid(), "host": addr.IP.String(), "port": addr.Port,
		"buffer_size": *bufferSize,
	})
	for {
		conn, err := listener.Accept()
		if err != nil {
			continue
		}
		s.mu.Lock()
		s.accepted++
		s.open[connFd(conn)] = true
		s.mu.Unlock()
		go s.serve(conn)
	}
}
