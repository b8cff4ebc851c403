// The bench's Go HTTP server (go_http_rps): Go's net/http serving a 1 KiB body at /1k.bin.
// Built with CGO_ENABLED=0, so statically linked: GuestLib never reaches it, in a tenant it
// goes through the tenant's relay — the path the metric measures.
//
//	gohttp ADDR
package main

import (
	"crypto/rand"
	"fmt"
	"net"
	"net/http"
	"os"
)

func main() {
	body := make([]byte, 1024)
	rand.Read(body)
	l, err := net.Listen("tcp", os.Args[1])
	if err != nil {
		fmt.Fprintln(os.Stderr, "listen:", err)
		os.Exit(1)
	}
	http.HandleFunc("/1k.bin", func(w http.ResponseWriter, r *http.Request) { w.Write(body) })
	fmt.Fprintln(os.Stderr, http.Serve(l, nil))
	os.Exit(1)
}
