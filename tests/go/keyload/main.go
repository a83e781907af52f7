// Command keyload prints the kids of the keys kube-apiserver loads from each file
// named on its command line, as one JSON object {"path": ["kid", ...], ...}.
//
// kube-apiserver reads --service-account-key-file with
// k8s.io/client-go/util/keyutil.PublicKeysFromFile. Its ParsePublicKeysPEM and the
// four parse helpers are reproduced below on the standard library only (the same
// calls in the same order), so sakeystate's bundle reader can be compared with the
// real encoding/pem and crypto/x509 without downloading any Kubernetes module.
// The kid is base64url(sha256(PKIX DER)), as kube-apiserver computes it.
package main

import (
	"crypto/ecdsa"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"os"
)

// parsePublicKeysPEM is keyutil.ParsePublicKeysPEM without its "no keys" error.
func parsePublicKeysPEM(keyData []byte) []interface{} {
	var block *pem.Block
	keys := []interface{}{}
	for {
		block, keyData = pem.Decode(keyData)
		if block == nil {
			break
		}
		if privateKey, err := parseRSAPrivateKey(block.Bytes); err == nil {
			keys = append(keys, &privateKey.PublicKey)
			continue
		}
		if publicKey, err := parseRSAPublicKey(block.Bytes); err == nil {
			keys = append(keys, publicKey)
			continue
		}
		if privateKey, err := parseECPrivateKey(block.Bytes); err == nil {
			keys = append(keys, &privateKey.PublicKey)
			continue
		}
		if publicKey, err := parseECPublicKey(block.Bytes); err == nil {
			keys = append(keys, publicKey)
			continue
		}
		// keyutil tolerates non-key PEM blocks.
	}
	return keys
}

func parsePKIXOrCertificate(data []byte) (interface{}, error) {
	parsedKey, err := x509.ParsePKIXPublicKey(data)
	if err == nil {
		return parsedKey, nil
	}
	cert, certErr := x509.ParseCertificate(data)
	if certErr != nil {
		return nil, err
	}
	return cert.PublicKey, nil
}

func parseRSAPublicKey(data []byte) (*rsa.PublicKey, error) {
	parsedKey, err := parsePKIXOrCertificate(data)
	if err != nil {
		return nil, err
	}
	pubKey, ok := parsedKey.(*rsa.PublicKey)
	if !ok {
		return nil, fmt.Errorf("data doesn't contain valid RSA Public Key")
	}
	return pubKey, nil
}

func parseRSAPrivateKey(data []byte) (*rsa.PrivateKey, error) {
	var parsedKey interface{}
	var err error
	if parsedKey, err = x509.ParsePKCS1PrivateKey(data); err != nil {
		if parsedKey, err = x509.ParsePKCS8PrivateKey(data); err != nil {
			return nil, err
		}
	}
	privKey, ok := parsedKey.(*rsa.PrivateKey)
	if !ok {
		return nil, fmt.Errorf("data doesn't contain valid RSA Private Key")
	}
	return privKey, nil
}

func parseECPublicKey(data []byte) (*ecdsa.PublicKey, error) {
	parsedKey, err := parsePKIXOrCertificate(data)
	if err != nil {
		return nil, err
	}
	pubKey, ok := parsedKey.(*ecdsa.PublicKey)
	if !ok {
		return nil, fmt.Errorf("data doesn't contain valid ECDSA Public Key")
	}
	return pubKey, nil
}

func parseECPrivateKey(data []byte) (*ecdsa.PrivateKey, error) {
	return x509.ParseECPrivateKey(data)
}

func kid(key interface{}) string {
	der, err := x509.MarshalPKIXPublicKey(key)
	if err != nil {
		return "unmarshalable: " + err.Error()
	}
	sum := sha256.Sum256(der)
	return base64.RawURLEncoding.EncodeToString(sum[:])
}

func main() {
	out := map[string][]string{}
	for _, path := range os.Args[1:] {
		data, err := os.ReadFile(path)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		kids := []string{}
		for _, key := range parsePublicKeysPEM(data) {
			kids = append(kids, kid(key))
		}
		out[path] = kids
	}
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
