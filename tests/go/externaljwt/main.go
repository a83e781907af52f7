// Command externaljwt is a client of an ExternalJWTSigner socket that holds its answers
// to what kube-apiserver's external signer plugin and key cache accept
// (pkg/serviceaccount/externaljwt/plugin), using the API's published Go code
// (k8s.io/externaljwt/apis/v1) and the JWS library kube-apiserver verifies tokens with.
//
//	externaljwt SOCKET
//
// It calls Metadata, FetchKeys and Sign, validates each answer as kube-apiserver
// would, assembles the token from the claims it sent and the header and signature it
// got back, verifies it with the fetched key of the header's kid, and prints a JSON
// summary. Any answer kube-apiserver would reject exits 1 with the reason.
package main

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	jose "gopkg.in/go-jose/go-jose.v2"
	"gopkg.in/go-jose/go-jose.v2/jwt"
	externaljwtv1 "k8s.io/externaljwt/apis/v1"
)

const minTokenSeconds = 600

type summary struct {
	Kids                      []string          `json:"kids"`
	DataTimestamp             string            `json:"data_timestamp"`
	RefreshHintSeconds        int64             `json:"refresh_hint_seconds"`
	MaxTokenExpirationSeconds int64             `json:"max_token_expiration_seconds"`
	Header                    map[string]string `json:"header"`
	Subject                   string            `json:"subject"`
}

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "externaljwt: "+format+"\n", args...)
	os.Exit(1)
}

func main() {
	if len(os.Args) != 2 {
		fail("usage: externaljwt SOCKET")
	}
	conn, err := grpc.NewClient(
		"passthrough:///"+os.Args[1],
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithAuthority("localhost"),
		grpc.WithContextDialer(func(ctx context.Context, path string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", path)
		}),
	)
	if err != nil {
		fail("dial: %v", err)
	}
	defer conn.Close()
	client := externaljwtv1.NewExternalJWTSignerClient(conn)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var out summary

	metadata, err := client.Metadata(ctx, &externaljwtv1.MetadataRequest{})
	if err != nil {
		fail("Metadata: %v", err)
	}
	if metadata.MaxTokenExpirationSeconds < minTokenSeconds {
		fail("Metadata: max_token_expiration_seconds %d < %d", metadata.MaxTokenExpirationSeconds, minTokenSeconds)
	}
	out.MaxTokenExpirationSeconds = metadata.MaxTokenExpirationSeconds

	keys := fetchKeys(ctx, client, &out)

	payload, _ := json.Marshal(map[string]any{
		"iss": "https://kubernetes.default.svc", "sub": "system:serviceaccount:go:client",
		"aud": []string{"https://kubernetes.default.svc"},
		"exp": time.Now().Add(time.Hour).Unix(), "iat": time.Now().Unix(),
	})
	claims := base64.RawURLEncoding.EncodeToString(payload)
	signed, err := client.Sign(ctx, &externaljwtv1.SignJWTRequest{Claims: claims})
	if err != nil {
		fail("Sign: %v", err)
	}
	out.Header = validateHeader(signed.Header)
	if len(signed.Signature) == 0 {
		fail("Sign: empty signature returned")
	}
	key, ok := keys[out.Header["kid"]]
	if !ok {
		fail("Sign: kid %q is not among the keys FetchKeys serves", out.Header["kid"])
	}
	token, err := jwt.ParseSigned(signed.Header + "." + claims + "." + signed.Signature)
	if err != nil {
		fail("token: %v", err)
	}
	var verified jwt.Claims
	if err := token.Claims(key, &verified); err != nil {
		fail("token does not verify with the served key %s: %v", out.Header["kid"], err)
	}
	out.Subject = verified.Subject
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		fail("%v", err)
	}
}

// fetchKeys is the key cache's validation of a FetchKeys answer.
func fetchKeys(ctx context.Context, client externaljwtv1.ExternalJWTSignerClient, out *summary) map[string]any {
	resp, err := client.FetchKeys(ctx, &externaljwtv1.FetchKeysRequest{})
	if err != nil {
		fail("FetchKeys: %v", err)
	}
	if resp.RefreshHintSeconds <= 0 {
		fail("FetchKeys: invalid refresh hint (%ds)", resp.RefreshHintSeconds)
	}
	if len(resp.Keys) == 0 {
		fail("FetchKeys: found no keys")
	}
	if err := resp.DataTimestamp.CheckValid(); err != nil {
		fail("FetchKeys: invalid data timestamp: %v", err)
	}
	keys := map[string]any{}
	for _, k := range resp.Keys {
		if k == nil {
			fail("FetchKeys: found nil public key")
		}
		if len(k.KeyId) == 0 || len(k.KeyId) > 1024 {
			fail("FetchKeys: found invalid public key id %q", k.KeyId)
		}
		if len(k.Key) == 0 {
			fail("FetchKeys: found empty public key")
		}
		parsed, err := x509.ParsePKIXPublicKey(k.Key)
		if err != nil {
			fail("FetchKeys: while parsing external public keys: %v", err)
		}
		keys[k.KeyId] = parsed
		out.Kids = append(out.Kids, k.KeyId)
	}
	out.DataTimestamp = resp.DataTimestamp.AsTime().Format(time.RFC3339Nano)
	out.RefreshHintSeconds = resp.RefreshHintSeconds
	return keys
}

// validateHeader is the plugin's check of the header Sign returns.
func validateHeader(encoded string) map[string]string {
	raw, err := base64.RawURLEncoding.DecodeString(encoded)
	if err != nil {
		fail("Sign: while unwrapping header: %v", err)
	}
	decoder := json.NewDecoder(bytes.NewBuffer(raw))
	decoder.DisallowUnknownFields()
	header := &struct {
		Algorithm string `json:"alg,omitempty"`
		KeyID     string `json:"kid,omitempty"`
		Type      string `json:"typ,omitempty"`
	}{}
	if err := decoder.Decode(header); err != nil {
		fail("Sign: while parsing header JSON: %v", err)
	}
	if header.Type != "JWT" {
		fail("Sign: bad type %q", header.Type)
	}
	if len(header.KeyID) == 0 || len(header.KeyID) > 1024 {
		fail("Sign: bad key id %q", header.KeyID)
	}
	switch jose.SignatureAlgorithm(header.Algorithm) {
	case jose.RS256, jose.ES256, jose.ES384, jose.ES512:
	default:
		fail("Sign: bad signing algorithm %q", header.Algorithm)
	}
	return map[string]string{"alg": header.Algorithm, "kid": header.KeyID, "typ": header.Type}
}
