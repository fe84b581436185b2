// delegated-fetch asks a SPIRE agent's Delegated Identity API (admin socket)
// for the X.509 SVIDs of a process (-pid) or of a selector set (-selector),
// the way the daemon under test does, and reports what came back and when.
//
// It prints one line per stream message:
//
//	msg=<n> elapsed_ms=<ms since the call> ids=<comma-separated SPIFFE IDs or "-">
//
// and stops after the first message, or, with -want ID, after the first
// message that carries ID (exit 0), or at -timeout (exit 1). Errors from the
// agent go to stderr with their gRPC code (exit 2). The caller must be one of
// the agent's authorized_delegates.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"strings"
	"time"

	delegatedidentityv1 "github.com/spiffe/spire-api-sdk/proto/spire/api/agent/delegatedidentity/v1"
	"github.com/spiffe/spire-api-sdk/proto/spire/api/types"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
)

type selectorList []*types.Selector

func (s *selectorList) String() string { return fmt.Sprint(len(*s)) }

func (s *selectorList) Set(v string) error {
	typ, value, ok := strings.Cut(v, ":")
	if !ok || typ == "" || value == "" {
		return fmt.Errorf("selector %q is not TYPE:VALUE", v)
	}
	*s = append(*s, &types.Selector{Type: typ, Value: value})
	return nil
}

func main() {
	socket := flag.String("socket", "", "agent admin socket path")
	pid := flag.Int("pid", 0, "process to attest (exclusive with -selector)")
	var selectors selectorList
	flag.Var(&selectors, "selector", "TYPE:VALUE, repeatable (exclusive with -pid)")
	want := flag.String("want", "", "keep reading until a message carries this SPIFFE ID")
	timeout := flag.Duration("timeout", 30*time.Second, "give up after this long")
	flag.Parse()
	if *socket == "" || (*pid == 0) == (len(selectors) == 0) {
		fmt.Fprintln(os.Stderr, "usage: delegated-fetch -socket PATH (-pid N | -selector T:V...) [-want ID] [-timeout D]")
		os.Exit(2)
	}
	os.Exit(run(*socket, int32(*pid), selectors, *want, *timeout))
}

func run(socket string, pid int32, selectors selectorList, want string, timeout time.Duration) int {
	conn, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		fmt.Fprintf(os.Stderr, "delegated-fetch: %v\n", err)
		return 2
	}
	defer conn.Close()

	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	start := time.Now()
	stream, err := delegatedidentityv1.NewDelegatedIdentityClient(conn).SubscribeToX509SVIDs(ctx,
		&delegatedidentityv1.SubscribeToX509SVIDsRequest{Pid: pid, Selectors: selectors})
	if err != nil {
		return report(err, start)
	}
	for n := 1; ; n++ {
		resp, err := stream.Recv()
		if err != nil {
			return report(err, start)
		}
		var ids []string
		found := false
		for _, s := range resp.GetX509Svids() {
			id := s.GetX509Svid().GetId()
			uri := "spiffe://" + id.GetTrustDomain() + id.GetPath()
			ids = append(ids, uri)
			found = found || uri == want
		}
		shown := strings.Join(ids, ",")
		if shown == "" {
			shown = "-"
		}
		fmt.Printf("msg=%d elapsed_ms=%.1f ids=%s\n", n, ms(start), shown)
		if want == "" || found {
			return 0
		}
	}
}

func report(err error, start time.Time) int {
	if errors.Is(err, context.DeadlineExceeded) || status.Code(err) == codes.DeadlineExceeded {
		fmt.Fprintf(os.Stderr, "delegated-fetch: timed out after %.1f ms\n", ms(start))
		return 1
	}
	st, _ := status.FromError(err)
	fmt.Fprintf(os.Stderr, "delegated-fetch: elapsed_ms=%.1f code=%s: %s\n", ms(start), st.Code(), st.Message())
	return 2
}

func ms(start time.Time) float64 { return float64(time.Since(start).Microseconds()) / 1000 }
