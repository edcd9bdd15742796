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
// address, length), reads completed, bytes received, RSS, and the runtime's MemStats. On
// SIGUSR2 it first collects its garbage (runtime.GC, which also sweeps every span), so the
// heap figures count live objects only, and then prints {"event": "heap", ...}: the heap's
// figures read once ground_truth's own garbage is made, with no allocation after them.
//
// With --bufio each connection is served the way net/http serves one: through a
// bufio.Reader and a bufio.Writer of --buffer-size bytes each (the goroutine then parks in
// conn.Read with the reader's buffer).
package main

import (
	"bufio"
	"encoding/json"
	"flag"
	"net"
	"os"
	"os/signal"
	"runtime"
	"runtime/metrics"
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
	bufio         bool
	accepted      int
	open          map[int]bool
	reading       map[int]buffer // goroutines inside conn.Read, by fd
	readsComplete int
	bytesReceived int
}

func (s *server) serveBufio(conn net.Conn) {
	fd := connFd(conn)
	r := bufio.NewReaderSize(conn, s.bufferSize)
	w := bufio.NewWriterSize(conn, s.bufferSize)
	defer func() {
		s.mu.Lock()
		delete(s.open, fd)
		s.mu.Unlock()
		conn.Close()
	}()
	buf := make([]byte, 512)
	for {
		n, err := r.Read(buf)
		if n > 0 {
			s.mu.Lock()
			s.readsComplete++
			s.bytesReceived += n
			s.mu.Unlock()
			w.Write(buf[:n])
			w.Flush()
		}
		if err != nil {
			return
		}
	}
}

func (s *server) serve(conn net.Conn) {
	if s.bufio {
		s.serveBufio(conn)
		return
	}
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
	runtime.ReadMemStats(&ms) // flushes every P's cache: its counts are exact
	tiny := []metrics.Sample{{Name: "/gc/heap/tiny/allocs:objects"}}
	metrics.Read(tiny)
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
		"heap_alloc":           ms.HeapAlloc,   // bytes of allocated objects (not swept: counted)
		"heap_objects":         ms.HeapObjects, // Mallocs - Frees: objects (a block of tiny ones: one)
		"tiny_allocs":          tiny[0].Value.Uint64(),
		"num_gc":               ms.NumGC,
		"goroutines":           runtime.NumGoroutine(),
	}
}

// What emitHeap reads and writes with, allocated up front: it allocates nothing itself, so
// the heap it reports is the heap as it stays once it is written (ground_truth's own JSON
// is garbage allocated after its MemStats were read).
var (
	heapStats  runtime.MemStats
	heapTiny   = []metrics.Sample{{Name: "/gc/heap/tiny/allocs:objects"}}
	heapRecord = make([]byte, 0, 512)
)

// emitHeap prints {"event": "heap", ...}: the runtime's heap figures at the moment they are
// printed, with nothing allocated between.
func emitHeap() {
	runtime.ReadMemStats(&heapStats)
	metrics.Read(heapTiny)
	line := append(heapRecord[:0], `{"event":"heap","heap_alloc":`...)
	line = strconv.AppendUint(line, heapStats.HeapAlloc, 10)
	line = append(line, `,"heap_objects":`...)
	line = strconv.AppendUint(line, heapStats.HeapObjects, 10)
	line = append(line, `,"tiny_allocs":`...)
	line = strconv.AppendUint(line, heapTiny[0].Value.Uint64(), 10)
	line = append(line, `,"heap_inuse":`...)
	line = strconv.AppendUint(line, heapStats.HeapInuse, 10)
	line = append(line, `,"stack_inuse":`...)
	line = strconv.AppendUint(line, heapStats.StackInuse, 10)
	line = append(line, "}\n"...)
	os.Stdout.Write(line)
}

// ballast: objects kept alive for the whole run, so walks of the heap can be timed on one
// of a realistic size: a tree of 64-byte nodes (pointers) with a 4 KiB buffer on every 32nd.
type node struct {
	left, right *node
	data        []byte
	n           int
	_           [16]byte
}

var ballast []*node

func makeBallast(mb int) {
	var parent []*node
	for total := 0; total < mb<<20; {
		n := &node{n: len(ballast)}
		total += 64
		if len(ballast)%32 == 0 {
			n.data = make([]byte, 4096)
			total += 4096
		}
		if len(parent) > 0 {
			p := parent[0]
			if p.left == nil {
				p.left = n
			} else {
				p.right = n
				parent = parent[1:]
			}
		}
		parent = append(parent, n)
		ballast = append(ballast, n)
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
	withBufio := flag.Bool("bufio", false, "serve through a bufio.Reader and Writer (as net/http)")
	ballastMB := flag.Int("ballast-mb", 0, "keep this many MiB of small objects alive")
	flag.Parse()

	var lim syscall.Rlimit
	if syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim) == nil {
		lim.Cur = lim.Max
		syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim)
	}
	makeBallast(*ballastMB)
	listener, err := net.Listen("tcp", net.JoinHostPort(*host, strconv.Itoa(*port)))
	if err != nil {
		os.Stderr.WriteString("go_server: " + err.Error() + "\n")
		os.Exit(1)
	}
	s := &server{
		bufferSize: *bufferSize, bufio: *withBufio, open: map[int]bool{}, reading: map[int]buffer{},
	}
	signals := make(chan os.Signal, 4)
	signal.Notify(signals, syscall.SIGUSR1, syscall.SIGUSR2, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		for sig := range signals {
			if sig == syscall.SIGUSR2 {
				runtime.GC()
			}
			emit(s.groundTruth())
			if sig == syscall.SIGUSR2 {
				emitHeap()
			}
			if sig != syscall.SIGUSR1 && sig != syscall.SIGUSR2 {
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
