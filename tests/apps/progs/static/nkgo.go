// A Go program for tests of the path for programs GuestLib cannot reach: the tests build it
// with CGO_ENABLED=0 (statically linked; Go makes its own system calls and, without cgo,
// resolves names itself from /etc/resolv.conf).
//
//	nkgo serve ADDR BYTES          HTTP server: GET /blob is BYTES pseudo-random bytes;
//	                               prints "READY <sha256 of the blob>"
//	nkgo get URL                   prints "OK <sha256> <length>" of the body
//	nkgo echoserve ADDR            TCP echo server; prints "READY"
//	nkgo echoclient ADDR N BYTES   N concurrent connections, each echoes a byte, then (all
//	                               of them open) sends BYTES and checks the echo; prints
//	                               "OK <N> <local address of the first>"
//	nkgo udpserve ADDR             UDP echo; prints "READY"
//	nkgo udpclient ADDR N          N datagrams, each echoed before the next (resent if lost);
//	                               prints "OK <N> <local address>"
package main

import (
	"bytes"
	"crypto/sha256"
	"fmt"
	"io"
	"math/rand"
	"net"
	"net/http"
	"os"
	"strconv"
	"sync"
	"time"
)

func fail(f string, a ...any) {
	fmt.Fprintf(os.Stderr, f+"\n", a...)
	os.Exit(1)
}

func blob(n int, seed int64) []byte {
	b := make([]byte, n)
	rand.New(rand.NewSource(seed)).Read(b)
	return b
}

func main() {
	if len(os.Args) < 3 {
		fail("usage: nkgo serve|get|echoserve|echoclient ...")
	}
	switch os.Args[1] {
	case "serve":
		n, _ := strconv.Atoi(os.Args[3])
		data := blob(n, 1)
		l, err := net.Listen("tcp", os.Args[2])
		if err != nil {
			fail("listen: %v", err)
		}
		fmt.Printf("READY %x\n", sha256.Sum256(data))
		http.HandleFunc("/blob", func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Length", strconv.Itoa(len(data)))
			w.Write(data)
		})
		fail("serve: %v", http.Serve(l, nil))
	case "get":
		r, err := http.Get(os.Args[2])
		if err != nil {
			fail("get: %v", err)
		}
		h := sha256.New()
		n, err := io.Copy(h, r.Body)
		if err != nil || r.StatusCode != 200 {
			fail("get: status %d after %d bytes: %v", r.StatusCode, n, err)
		}
		fmt.Printf("OK %x %d\n", h.Sum(nil), n)
	case "echoserve":
		l, err := net.Listen("tcp", os.Args[2])
		if err != nil {
			fail("listen: %v", err)
		}
		fmt.Println("READY")
		for {
			c, err := l.Accept()
			if err != nil {
				fail("accept: %v", err)
			}
			go func() { io.Copy(c, c); c.Close() }()
		}
	case "echoclient":
		n, _ := strconv.Atoi(os.Args[3])
		size, _ := strconv.Atoi(os.Args[4])
		var wg sync.WaitGroup
		errs := make(chan error, 2*n)
		first := make(chan string, 1)
		// All connections are open before any sends: they are concurrent, not in turn.
		conns := make([]net.Conn, n)
		for i := range conns {
			c, err := net.Dial("tcp", os.Args[2])
			if err != nil {
				fail("dial %d: %v", i, err)
			}
			conns[i] = c
		}
		first <- conns[0].LocalAddr().String()
		// Open end to end, all at once: a byte echoed on each before any sends more (a
		// relayed dial completes before the connection behind it exists).
		var pinged sync.WaitGroup
		for i, c := range conns {
			pinged.Add(1)
			go func(i int, c net.Conn) {
				defer pinged.Done()
				b := []byte{'p'}
				if _, err := c.Write(b); err != nil {
					errs <- fmt.Errorf("connection %d: ping: %v", i, err)
				} else if _, err := io.ReadFull(c, b); err != nil {
					errs <- fmt.Errorf("connection %d: ping: %v", i, err)
				}
			}(i, c)
		}
		pinged.Wait()
		for i, c := range conns {
			wg.Add(1)
			go func(i int, c net.Conn) {
				defer wg.Done()
				defer c.Close()
				want := blob(size, int64(i))
				go func() { c.Write(want); c.(*net.TCPConn).CloseWrite() }()
				got, err := io.ReadAll(c)
				if err != nil || !bytes.Equal(got, want) {
					errs <- fmt.Errorf("connection %d: %d of %d bytes back: %v", i, len(got), size, err)
				}
			}(i, c)
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			fail("%v", err)
		}
		fmt.Printf("OK %d %s\n", n, <-first)
	case "udpserve":
		c, err := net.ListenPacket("udp", os.Args[2])
		if err != nil {
			fail("listen: %v", err)
		}
		fmt.Println("READY")
		buf := make([]byte, 65536)
		for {
			n, from, err := c.ReadFrom(buf)
			if err != nil {
				fail("read: %v", err)
			}
			c.WriteTo(buf[:n], from)
		}
	case "udpclient":
		n, _ := strconv.Atoi(os.Args[3])
		c, err := net.Dial("udp", os.Args[2])
		if err != nil {
			fail("dial: %v", err)
		}
		buf := make([]byte, 65536)
		for i := 0; i < n; i++ {
			want := blob(1+(i*1237)%9000, int64(i))
			for tries := 0; ; tries++ {
				if tries == 5 {
					fail("datagram %d: no answer", i)
				}
				c.Write(want)
				c.SetReadDeadline(time.Now().Add(time.Second))
				k, err := c.Read(buf)
				if err == nil && bytes.Equal(buf[:k], want) {
					break
				}
			}
		}
		fmt.Printf("OK %d %s\n", n, c.LocalAddr())
	default:
		fail("unknown command %q", os.Args[1])
	}
}
