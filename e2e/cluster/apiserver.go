package main

import (
	"context"
	"fmt"
	"net"

	"github.com/spf13/pflag"
	utilerrors "k8s.io/apimachinery/pkg/util/errors"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"
	logsapi "k8s.io/component-base/logs/api/v1"
	"k8s.io/klog/v2"
	"k8s.io/kubernetes/cmd/kube-apiserver/app"
	"k8s.io/kubernetes/cmd/kube-apiserver/app/options"
)

func init() {
	// Three components in one process each apply the logging options; the same ones again are fine.
	logsapi.ReapplyHandling = logsapi.ReapplyHandlingIgnoreUnchanged
}

// startAPIServer follows cmd/kube-apiserver/app/testing/testserver.go at v1.37.2 without the test
// scaffolding: options from flags -> Complete -> Validate -> NewConfig -> Complete -> CreateServerChain
// -> PrepareRun().Run. Not NewAPIServerCommand: it installs a signal handler, which panics when a
// second component of this process installs its own.
func startAPIServer(ctx context.Context, p *pki, ports portsFile) (<-chan error, error) {
	s := options.NewServerRunOptions()
	fs := pflag.NewFlagSet("kube-apiserver", pflag.ContinueOnError)
	for _, f := range s.Flags().FlagSets {
		fs.AddFlagSet(f)
	}
	args := []string{
		fmt.Sprintf("--etcd-servers=http://127.0.0.1:%d", ports.Etcd),
		"--bind-address=127.0.0.1",
		"--advertise-address=127.0.0.1",
		fmt.Sprintf("--secure-port=%d", ports.APIServer),
		"--cert-dir=" + p.path("apiserver-generated"),
		"--tls-cert-file=" + p.path("apiserver.crt"),
		"--tls-private-key-file=" + p.path("apiserver.key"),
		"--client-ca-file=" + p.path("ca.crt"),
		"--authorization-mode=Node,RBAC",
		// The default plugins (NamespaceLifecycle, LimitRanger, ServiceAccount, PodSecurity, Priority,
		// DefaultTolerationSeconds, ResourceQuota, the admission webhooks and policies, ...) plus
		// NodeRestriction, as kubeadm enables it.
		"--enable-admission-plugins=NodeRestriction",
		"--service-account-issuer=" + issuer,
		"--service-account-key-file=" + p.path("sa.pub"),
		"--service-account-signing-key-file=" + p.path("sa.key"),
		"--service-cluster-ip-range=" + serviceCIDR,
		"--allow-privileged=true",
		// The Endpoints of the kubernetes Service may not hold a loopback address; in-cluster clients
		// reach the apiserver through KUBERNETES_SERVICE_HOST/PORT set by the kubelet instead.
		"--endpoint-reconciler-type=none",
		"--profiling=false",
		// On SIGTERM, end the open watches (their clients re-list and watch again, as after a real
		// apiserver restart) instead of waiting out the HTTP server's 60 s shutdown timeout for them.
		"--shutdown-watch-termination-grace-period=2s",
	}
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if err := s.GenericServerRunOptions.ComponentGlobalsRegistry.Set(); err != nil {
		return nil, err
	}
	// kube-apiserver's loopback clients should not log self-issued warnings (as its command does).
	rest.SetDefaultWarningHandler(rest.NoWarnings{})

	l, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", ports.APIServer))
	if err != nil {
		return nil, err
	}
	s.SecureServing.Listener = l
	informerName, err := cache.NewInformerName("kube-apiserver")
	if err != nil {
		return nil, err
	}
	s.InformerName = informerName

	completed, err := s.Complete(ctx)
	if err != nil {
		return nil, err
	}
	if errs := completed.Validate(); len(errs) != 0 {
		return nil, utilerrors.NewAggregate(errs)
	}
	s.GenericServerRunOptions.ComponentGlobalsRegistry.AddMetrics()
	config, err := app.NewConfig(completed)
	if err != nil {
		return nil, err
	}
	cc, err := config.Complete()
	if err != nil {
		return nil, err
	}
	chain, err := app.CreateServerChain(cc)
	if err != nil {
		return nil, err
	}
	done := make(chan error, 1)
	go func() {
		defer close(done)
		prepared, err := chain.PrepareRun()
		if err != nil {
			done <- err
			return
		}
		klog.InfoS("kube-apiserver serving", "port", ports.APIServer)
		done <- prepared.Run(ctx)
	}()
	return done, nil
}
