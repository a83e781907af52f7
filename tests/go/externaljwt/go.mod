module sakeystate.test/externaljwt

go 1.26.0

require (
	google.golang.org/grpc v1.82.1
	gopkg.in/go-jose/go-jose.v2 v2.6.3
	k8s.io/externaljwt v0.37.2
)

require (
	github.com/stretchr/testify v1.12.1 // indirect
	golang.org/x/crypto v0.54.0 // indirect
	golang.org/x/net v0.57.0 // indirect
	golang.org/x/sys v0.47.0 // indirect
	golang.org/x/text v0.40.0 // indirect
	google.golang.org/genproto/googleapis/rpc v0.0.0-20260526163538-3dc84a4a5aaa // indirect
	google.golang.org/protobuf v1.36.12-0.20260120151049-f2248ac996af // indirect
)
